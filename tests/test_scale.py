"""Scale-out: sharded training on simulated device meshes, two-process (gloo) runs, restoring onto
another mesh, rematerialisation and bfloat16 compute.

Device counts are fixed when JAX starts, so every multi-device run happens in a fresh subprocess
(`_run_on_devices`) that trains with the real `mimjax.train.train` and leaves its metrics in the
workdir.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, TINY_DECODER, config_flags, load_config, metrics_records, tiny_overrides
from mimjax import config_lib
from mimjax import registry
from mimjax import train
from mimjax import train_step as train_step_lib
from mimjax.data import pipeline

# Small enough that the mu/4 kernels (e.g. MlpBlock_0/Dense_0 [32, 128]) are fsdp-sharded.
FSDP_MIN_SIZE = 256


def _mae_config(**extra):
  return load_config('configs/mae.py:runlocal', **tiny_overrides(**TINY_DECODER, **extra))


def _lut_config(**extra):
  return load_config('configs/mae_lut.py:runlocal',
                     **tiny_overrides(**TINY_DECODER, **{'lut.head_dim': 32}, **extra))


_host_batches = pipeline.train_batches  # the real per-host stream, before any monkeypatching


def _curve(workdir, key='loss'):
  return np.array([r[key] for r in metrics_records(workdir)])


# Trains each (config JSON, workdir) job with the real trainer on N simulated CPU devices, then
# reports how the trainer's state shardings split a few arrays of each config (the same functions
# `train.train` uses to place its state).
_WORKER = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', int(sys.argv[1]))
    from mimjax import config_lib, registry, sharding, train, train_step
    from mimjax.data import pipeline
    jobs = json.loads(sys.argv[2])
    report = {}
    for config_json, workdir in jobs:
      config = config_lib.from_json(config_json)
      train.train(config, workdir)
      mesh = sharding.make_mesh(config.mesh)
      sample = train.sample_batch(next(pipeline.train_batches(config)))
      fw = registry.build(config)
      init_fn, abstract, _, _ = train_step.build(fw, config, sample)
      state = jax.jit(init_fn, out_shardings=train_step.state_shardings(abstract, mesh,
                                                                        config.mesh))()
      flat = jax.tree_util.tree_flatten_with_path(state)[0]
      report[workdir] = {jax.tree_util.keystr(path): [list(leaf.shape),
                                                      list(leaf.addressable_shards[0].data.shape)]
                         for path, leaf in flat}
    print('REPORT' + json.dumps(report))
''')


def _run_on_devices(n, jobs):
  """Runs `jobs` [(config, workdir)] in one subprocess with `n` CPU devices; returns its report."""
  payload = json.dumps([(config_lib.to_json(c), str(w)) for c, w in jobs])
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', _WORKER, str(n), payload], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [ln for ln in result.stdout.splitlines() if ln.startswith('REPORT')][-1]
  return json.loads(line[len('REPORT'):])


def _with_mesh(config, data, fsdp):
  config = config_lib.from_json(config_lib.to_json(config))
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = data, fsdp, FSDP_MIN_SIZE
  return config


# ------------------------------------------------------------------ sharded training, 8 devices


@pytest.mark.slow  # three fresh JAX processes, seven short runs: 3-9 minutes on 2 busy cores
def test_data_parallel_and_fsdp_match_one_device_and_restore_onto_another_mesh(tmp_path):
  """Same global batch, same data stream, same masks: only the reduction order differs."""
  runs = {}
  for name, config in (('mae', _mae_config()), ('lut', _lut_config())):
    runs[name] = {mesh: (_with_mesh(config, *mesh), tmp_path / f'{name}_{mesh[0]}x{mesh[1]}')
                  for mesh in ((1, 1), (8, 1), (2, 4))}
  _run_on_devices(1, [runs[n][(1, 1)] for n in runs])
  report = _run_on_devices(8, [runs[n][m] for n in runs for m in ((8, 1), (2, 4))])

  for name in runs:
    one = _curve(runs[name][(1, 1)][1])
    assert len(one) == 6 and np.all(np.isfinite(one))
    assert np.ptp(one) > 1e-3  # the trajectory moves, so matching it means something
    for mesh in ((8, 1), (2, 4)):
      np.testing.assert_allclose(_curve(runs[name][mesh][1]), one, rtol=2e-5,
                                 err_msg=f'{name} on mesh {mesh}')
      np.testing.assert_allclose(_curve(runs[name][mesh][1], 'grad_norm'),
                                 _curve(runs[name][(1, 1)][1], 'grad_norm'), rtol=2e-4)

  # fsdp=4 really splits parameters, Adam moments and LUT's EMA context encoder; data=8 does not.
  kernel = "['encoder']['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"
  for name in runs:
    sharded = report[str(runs[name][(2, 4)][1])]
    assert sharded[".params" + kernel] == [[32, 128], [32, 32]]
    assert sharded[".opt_state[0][0].mu" + kernel] == [[32, 128], [32, 32]]
    assert sharded[".params['encoder']['embedding']['kernel']"] == [[4, 4, 3, 32], [4, 4, 3, 8]]
    assert sharded['.step'] == [[], []]
    replicated = report[str(runs[name][(8, 1)][1])]
    assert replicated[".params" + kernel] == [[32, 128], [32, 128]]
  ema = [k for k, v in report[str(runs['lut'][(2, 4)][1])].items()
         if k.startswith('.model_state') and 'MlpBlock_0' in k and k.endswith("['kernel']")]
  assert ema
  for k in ema:
    full, shard = report[str(runs['lut'][(2, 4)][1])][k]
    assert np.prod(shard) * 4 == np.prod(full), k

  # Resume the fsdp run's step-3 checkpoint on 4 devices, data-parallel; continue to step 6.
  config, original = runs['mae'][(2, 4)]
  moved = tmp_path / 'mae_moved'
  shutil.copytree(original, moved)
  shutil.rmtree(moved / 'checkpoints' / '6')
  _run_on_devices(4, [(_with_mesh(config, 4, 1), moved)])
  a, b = metrics_records(original), metrics_records(moved)
  assert [r['step'] for r in b] == list(range(1, 7))
  for key in ('loss', 'grad_norm', 'lr'):
    np.testing.assert_allclose([r[key] for r in b[3:]], [r[key] for r in a[3:]], rtol=2e-5,
                               err_msg=key)


# ------------------------------------------------------------------ two processes (gloo)


def _two_host_stream(config, start_step=0):
  """The global batches of a 2-process run, built in one process: host 0's rows, then host 1's."""
  hosts = [_host_batches(config, start_step, i, 2) for i in range(2)]
  for parts in zip(*hosts):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.slow  # two processes plus two in-process runs: ~3 minutes on 2 busy cores
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path, monkeypatch):
  """Each host reads its own half of the split (`tfds.even_splits`), so a 2-process run sees other
  batches than a plain 1-process run. What is invariant is the global batch: the reference run
  here is one process fed exactly the rows the two hosts feed (host 0's, then host 1's), and
  the 2-process losses must equal it. Resuming the 2-process checkpoint in one process then must
  continue that same trajectory, which needs params, optimizer state and step restored intact.
  """
  overrides = tiny_overrides(**TINY_DECODER, **{'log.images_every_steps': 6})  # 6 steps
  workdir = tmp_path / 'two'
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', LOG_DIR=str(tmp_path))
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      ['launch/local_multiprocess.sh', '2', '--config', 'configs/mae.py:runlocal',
       *config_flags(overrides), f'--workdir={workdir}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  logs = ''.join(open(tmp_path / f'process_{i}.log').read()[-2000:] for i in range(2))
  assert result.returncode == 0, result.stderr + logs
  # process 0 wrote it
  assert os.path.exists(workdir / 'images' / 'reconstruction_norm_pix_0000006.png')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']

  monkeypatch.setattr(pipeline, 'train_batches', _two_host_stream)
  config = _mae_config(**{'log.images_every_steps': 0})
  reference = tmp_path / 'reference'
  train.train(config, str(reference))  # 6 steps
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(_curve(workdir, key), _curve(reference, key), rtol=2e-5)

  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  final = train.train(config, str(resumed))  # restores step 3 in this one process, runs 4 to 6
  assert final['step'] == 6 and len(metrics_records(resumed)) == 6
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(_curve(resumed, key)[3:], _curve(reference, key)[3:], rtol=2e-5)


# ------------------------------------------------------------------ remat and mixed precision


def _loss_and_grads(config, batch):
  fw = registry.build(config)
  params, model_state = jax.jit(fw.init)(jax.random.PRNGKey(0), batch)
  grad_fn = jax.jit(jax.value_and_grad(fw.loss, has_aux=True))
  (loss, _), grads = grad_fn(params, model_state, batch, jax.random.PRNGKey(1), jnp.int32(0))
  return params, loss, grads


def _batch(config, n=8):
  return {'image': np.random.default_rng(0).normal(
      size=(n, config.data.image_size, config.data.image_size, 3)).astype(np.float32)}


def test_remat_gives_the_same_loss_and_gradients():
  config = _mae_config(**{'model.variant': 'pico/4'})  # 4 blocks
  _, loss, grads = _loss_and_grads(config, _batch(config))
  with config.unlocked():
    config.model.remat = True
  _, loss_remat, grads_remat = _loss_and_grads(config, _batch(config))
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  flat, flat_remat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_remat)
  assert len(flat) == len(flat_remat)
  for g, g_remat in zip(flat, flat_remat):
    np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_is_close_to_float32_with_float32_params_and_updates():
  config = _mae_config()
  batch = _batch(config)
  _, loss32, grads32 = _loss_and_grads(config, batch)
  with config.unlocked():
    config.model.dtype = 'bfloat16'
  params, loss16, grads16 = _loss_and_grads(config, batch)
  # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); the loss is a mean over many
  # tokens, so its error averages down well below that.
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads16))
  cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))  # noqa: E731
  flat32 = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads32)])
  flat16 = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(grads16)])
  assert cos(flat16, flat32) > 0.99

  # The updated state's dtypes, traced (not compiled): float32 params and moments after a step.
  fw = registry.build(config)
  init_fn, _, tx, lr = train_step_lib.build(fw, config, batch)
  state, _ = jax.eval_shape(train_step_lib.make_train_step(fw, tx, lr), jax.eval_shape(init_fn),
                            batch)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
  assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(state.opt_state)
             if m.ndim)
