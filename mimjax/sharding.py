"""Device mesh and shardings: batch over (data, fsdp); parameters replicated or fsdp-sharded by
regex rules over their paths; optimizer and EMA state sharded like the parameters they mirror."""
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mimjax import errors
from mimjax import tree_util

BATCH_AXES = ('data', 'fsdp')


PARAM_RULES = ('fsdp', 'replicate')


def check_config(config):
  """The `config.mesh` fields, before the devices are counted: axis sizes, rules and threshold."""
  m = config.mesh
  for key in ('data', 'fsdp'):
    errors.require(m[key] == -1 or m[key] >= 1, f'mesh.{key}', m[key],
                   'use a positive number of devices, or -1 for every device the other axis '
                   'leaves')
  errors.require(m.fsdp_min_size >= 0, 'mesh.fsdp_min_size', m.fsdp_min_size,
                 'use a number of elements >= 0')
  for rule in m.param_rules:
    pattern, placement = (tuple(rule) + (None, None))[:2]
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise errors.ConfigError(f'config.mesh.param_rules: {pattern!r} is not a regular '
                               f'expression ({e}).') from e
    errors.require(len(rule) == 2 and placement in PARAM_RULES, 'mesh.param_rules', tuple(rule),
                   f'each rule is (regex, placement) with placement one of {PARAM_RULES}')


def make_mesh(mesh_config, devices=None):
  """Mesh with axes (data, fsdp), both of explicit type Auto; -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = {'data': mesh_config.data, 'fsdp': mesh_config.fsdp}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise errors.ConfigError('At most one mesh axis may be -1 (config.mesh).')
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if unknown:
    if n % known:
      raise errors.ConfigError(f'{n} devices do not divide into mesh axes {dict(sizes)}; '
                               f'set config.mesh so the fixed axes divide {n}.')
    sizes[unknown[0]] = n // known
  if int(np.prod(list(sizes.values()))) != n:
    raise errors.ConfigError(f'config.mesh {dict(sizes)} needs {np.prod(list(sizes.values()))} '
                             f'devices, but {n} are available; use -1 for one axis to fill the '
                             'rest.')
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices,
                       axis_types=(AxisType.Auto,) * len(sizes))


def batch_sharding(mesh):
  """Leading (batch) dimension split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch, mesh, what='batch_size'):
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise errors.ConfigError(f'{what} {global_batch} does not divide over the {n} devices of the '
                             f'batch axes (data x fsdp); choose a multiple of {n}.')


def _fsdp_spec(shape, fsdp_size, min_size):
  """Shard the largest dimension divisible by the fsdp axis; replicate small arrays."""
  if fsdp_size == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def param_specs(params, mesh, mesh_config):
  """PartitionSpec per array from config.mesh.param_rules: the first regex found in its path wins.

  Rules use `re.search`, so a rule for `encoder/.*kernel` also covers the optimizer moments and
  EMA copies of those kernels, whose paths contain the parameter path.
  """
  def spec(path, leaf):
    name = tree_util.path_str(path)
    for pattern, rule in mesh_config.param_rules:
      if re.search(pattern, name):
        if rule == 'replicate':
          return P()
        if rule == 'fsdp':
          return _fsdp_spec(leaf.shape, mesh.shape['fsdp'], mesh_config.fsdp_min_size)
        raise errors.ConfigError(f'Unknown sharding rule {rule!r} for {pattern!r} in '
                                 'config.mesh.param_rules; use "fsdp" or "replicate".')
    return P()
  return jax.tree_util.tree_map_with_path(spec, params)


def tree_shardings(tree, mesh, mesh_config):
  """NamedSharding for every array of a pytree (params, optimizer state, EMA copies, ...).

  Leaves of rank 0 (step counters) are replicated; others follow the fsdp rules by path.
  """
  specs = param_specs(tree, mesh, mesh_config)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
