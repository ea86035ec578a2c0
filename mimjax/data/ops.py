"""Small TensorFlow building blocks of the augmentations, in the forms that are fast on CPU.

Measured on one tf.data thread (BENCHMARKS.md, Input pipeline), a [224, 224, 3] float image:
`tf.where` (SelectV2, which supports broadcasting) takes ~0.65 ms where the same-shape `Select`
takes ~0.05 ms; a product with a per-channel 3-vector broadcast over the last axis ~0.45 ms where
three channel slices take ~0.1 ms; and a `tf.cond` / `tf.switch_case` lowered to Switch/Merge (the
default) runs every node of the branches not taken as a dead node, so RandAugment's 14 unused ops
cost more than the one it applies (`case` below; for colour jitter's and 3-augment's few, small,
nested branches the lowered form measured as fast or faster, so they keep it).
"""
import tensorflow as tf
from tensorflow.python.ops import cond_v2  # pylint: disable=g-direct-tensorflow-import

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's 'L' conversion and torchvision's rgb_to_grayscale


def select(condition, x, y):
  """`tf.where(condition, x, y)` for `condition` of x's shape or a scalar (`y` of x's shape)."""
  return tf.raw_ops.Select(condition=condition, x=x, y=y)


def luma(image):
  """[..., 1] ITU-R 601 luma of RGB pixels [..., 3], as three channel slices."""
  return image[..., 0:1] * _LUMA[0] + image[..., 1:2] * _LUMA[1] + image[..., 2:3] * _LUMA[2]


def case(index, branches):
  """`tf.switch_case(index, branches)`, running only the branch taken.

  A Case op marked not to be lowered to Switch/Merge calls the chosen branch as a function; the
  lowered one (tf.switch_case's default) passes dead tensors through every node of every other
  branch. Same branch, same result. (Eagerly, the chosen branch is simply called.) It calls
  TensorFlow's internal `cond_v2.indexed_case`, which tf.switch_case calls too: not a public API,
  so tests/test_data_ops.py checks the op and its attribute, and a TensorFlow upgrade that changes
  them fails there.
  """
  if tf.executing_eagerly():
    return branches[int(index)]()
  return cond_v2.indexed_case(tf.cast(index, tf.int32), branches, lower_using_switch_merge=False)
