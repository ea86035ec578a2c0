"""Helpers on nested containers that several layers share: a parameter's path as one name, and a
nested dict as dotted keys (the spelling `--config.KEY=VALUE` takes)."""


def path_str(path):
  """'encoder/Transformer/encoderblock_0/...' from a jax tree path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def flatten_dict(tree, prefix=''):
  """{'a.b.c': value} for every non-dict leaf of the nested dict `tree`, in its order."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten_dict(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = value
  return flat
