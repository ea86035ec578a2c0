"""The train state and the jitted update step (shardings on a mesh, donated state, no host sync)."""
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from mimjax import optim
from mimjax import sharding
from mimjax.models import vit

# Dynamic loss scaling for float16 compute, with the usual dynamic scaler's constants (jmp, torch's
# GradScaler): start at 2^15, halve on an overflow, double after 2000 finite steps in a row.
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_PERIOD = 2000
LOSS_SCALE_MIN = 1.0


@flax.struct.dataclass
class LossScale:
  """Dynamic loss-scale state of a float16 run (float32/int32 scalars, checkpointed with the
  state): the current `scale`, the finite steps since it last changed, and the run's total of
  updates skipped for a gradient overflow."""
  scale: jax.Array
  good_steps: jax.Array
  skipped: jax.Array

  @classmethod
  def create(cls, scale=None):
    """The initial state: `scale` (default LOSS_SCALE_INIT), no finite steps, nothing skipped."""
    return cls(scale=jnp.asarray(LOSS_SCALE_INIT if scale is None else scale, jnp.float32),
               good_steps=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))

  def adjust(self, grads_finite, period=LOSS_SCALE_PERIOD):
    """The next scale: halved (not below LOSS_SCALE_MIN) and the skip counted after an overflow;
    doubled after `period` finite steps in a row."""
    good = jnp.where(grads_finite, self.good_steps + 1, 0)
    grow = good >= period
    scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale * 0.5, LOSS_SCALE_MIN))
    return LossScale(scale=scale, good_steps=jnp.where(grow, 0, good),
                     skipped=self.skipped + (~grads_finite).astype(jnp.int32))


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  model_state: Any  # non-trained state: EMA encoders, teachers, running statistics
  rng: jax.Array  # base key; step keys are fold_in(rng, step)
  # LossScale for float16 compute, else None (an empty subtree: float32/bfloat16 states and their
  # checkpoints have the same leaves as before loss scaling existed).
  loss_scale: Any = None


def uses_loss_scaling(config):
  """Whether `config` computes in float16 (model.dtype 'float16', or 'auto' on a GPU of compute
  capability < 8.0): float16's 5 exponent bits underflow small gradients without a loss scale."""
  return vit.compute_dtype(config.model.dtype) == jnp.float16


class Built(NamedTuple):
  """What `build` returns: the state's init function and shapes, the optimizer, its lr schedule."""
  init_fn: Callable
  abstract_state: Any
  tx: optax.GradientTransformation
  lr_schedule: Callable


def build(framework, config, sample_batch):
  """`Built` (init_fn, abstract_state, tx, lr_schedule) for `framework` on batches like
  `sample_batch`.

  Shapes come from `jax.eval_shape`, so nothing is allocated until the caller jits `init_fn` with
  the target shardings or restores a checkpoint onto them.
  """
  probe_params = jax.eval_shape(lambda: framework.init(jax.random.PRNGKey(0), sample_batch)[0])
  tx, lr_schedule = optim.make_optimizer(config, probe_params, framework.no_weight_decay)
  init_fn = init_state_fn(framework, tx, sample_batch, config.seed, uses_loss_scaling(config))
  return Built(init_fn, jax.eval_shape(init_fn), tx, lr_schedule)


def init_state_fn(framework, tx, batch, seed, loss_scaling=False):
  """A function (to jit or eval_shape) building the initial TrainState, optionally with some
  params taken from `pretrained` (see `Framework.init`); with a LossScale when `loss_scaling`."""
  def init(pretrained=None):
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = framework.init(init_rng, batch, pretrained)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state, rng=state_rng,
                      loss_scale=LossScale.create() if loss_scaling else None)
  return init


def state_shardings(abstract_state, mesh, mesh_config):
  """Shardings of every TrainState leaf (params, moments and EMA copies follow the fsdp rules)."""
  return sharding.tree_shardings(abstract_state, mesh, mesh_config)


def with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying target shardings: the restore target for Orbax."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def _split_microbatches(batch, accum_steps):
  return jax.tree_util.tree_map(
      lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)


def make_train_step(framework, tx, lr_schedule, accum_steps=1):
  """(state, batch) -> (state, metrics). A non-finite loss, gradient or update leaves the state
  unchanged (and sets metrics['nonfinite'] = 1), so NaNs never reach the parameters or a
  checkpoint, even when the loss and gradient are finite (e.g. Adam b2 = 1, lr 1e40).

  A state with a `loss_scale` (float16 compute) differentiates loss * scale and divides the
  gradients by it. A gradient overflow with a finite loss is then expected, not a failure: the
  update is skipped (state unchanged but the step count and the scale), the scale halves, and
  metrics['overflow'] = 1 instead of 'nonfinite'; metrics['loss_scale'] is the scale used.

  metrics['lr'] is the one source of the logged lr: that of this step's update (`optim.applied_lr`,
  the schedule at the optimizer's count, which a skipped update does not advance), one per step
  however many micro-batches it accumulates; the log shows its interval's last step's value.
  """

  def loss_and_grad(params, model_state, batch, rng, step, scale):
    def scaled_loss(params):
      loss, aux = framework.loss(params, model_state, batch, rng, step)
      return (loss if scale is None else loss * scale), aux
    (_, (metrics, model_state)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
    return grads, metrics, model_state

  def train_step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    scale = None if state.loss_scale is None else state.loss_scale.scale
    if accum_steps == 1:
      grads, metrics, model_state = loss_and_grad(state.params, state.model_state, batch, rng,
                                                  state.step, scale)
    else:
      def micro(carry, xs):
        grad_sum, metric_sum, model_state = carry
        i, microbatch = xs
        grads, metrics, model_state = loss_and_grad(
            state.params, model_state, microbatch, jax.random.fold_in(rng, i), state.step, scale)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731
        return (add(grad_sum, grads), add(metric_sum, metrics), model_state), None
      micro_batches = _split_microbatches(batch, accum_steps)
      zeros_g = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
      _, metrics_shape, _ = jax.eval_shape(loss_and_grad, state.params, state.model_state, first,
                                           rng, state.step, scale)
      zeros_m = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
      (grads, metrics, model_state), _ = jax.lax.scan(
          micro, (zeros_g, zeros_m, state.model_state),
          (jnp.arange(accum_steps), micro_batches))
      grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
      metrics = jax.tree_util.tree_map(lambda m: m / accum_steps, metrics)
    # The update, its norms and the finiteness guard run over the optimizer's flat buffers when it
    # has them (optim.flat_update: a few kernels instead of a chain per leaf on XLA:CPU), else per
    # leaf; the state keeps the per-leaf layout either way. The 'optimizer' scope names these
    # kernels' class in `bench --profile`.
    inner_tx, view = optim.update_view(tx)
    with jax.named_scope('optimizer'):
      flat_grads = view.flatten(grads)
      if scale is not None:
        flat_grads = jax.tree_util.tree_map(lambda g: g / scale, flat_grads)
      flat_params = view.flatten(state.params)
      flat_opt = view.flatten_state(state.opt_state)
      grad_norm = optax.global_norm(flat_grads)
      updates, new_opt = inner_tx.update(flat_grads, flat_opt, flat_params)
      new_params = optax.apply_updates(flat_params, updates)
      # The update itself is checked, not only its inputs: a finite loss and gradient can still
      # give a NaN or infinite update (lr 1e40, Adam's b2 = 1 dividing by a zero second moment). A
      # finite update of finite params keeps params, optimizer moments and the EMA teachers derived
      # from them finite, so one global norm stands for the per-leaf checks of every tree, which
      # cost three small kernels per leaf and, on XLA:CPU, minutes of compile time
      # (ThunkExecutor's dependency graph) at ViT-S size.
      update_norm = optax.global_norm(updates)
    model_state = framework.update_state(view.unflatten(new_params), model_state, state.step)
    loss_finite = jnp.isfinite(metrics['loss'])
    grads_finite = jnp.isfinite(grad_norm)
    finite = loss_finite & grads_finite & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    with jax.named_scope('optimizer'):
      params = view.unflatten(keep(new_params, flat_params))
      opt_state = view.unflatten_state(keep(new_opt, flat_opt))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=keep(model_state, state.model_state))
    if scale is None:
      failed = ~finite
    else:
      # Only an overflow of the scaled backward pass (finite loss, non-finite gradient) is the
      # scaler's to absorb; a non-finite loss, or a non-finite update of finite gradients, is a
      # diverged run as without scaling.
      overflow = loss_finite & ~grads_finite
      failed = ~finite & ~overflow
      new_state = new_state.replace(loss_scale=state.loss_scale.adjust(grads_finite))
      metrics = dict(metrics, loss_scale=scale, overflow=overflow.astype(jnp.float32))
    metrics = dict(metrics, grad_norm=grad_norm, lr=optim.applied_lr(lr_schedule, flat_opt),
                   nonfinite=failed.astype(jnp.float32))
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_sharding, mesh):
  """jit with the state sharded as given, the batch over (data, fsdp), and the state donated."""
  return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
