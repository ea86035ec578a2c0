"""mimjax.data.ops: the fast forms compute what the plain TensorFlow ops compute."""
import numpy as np
import pytest
import tensorflow as tf

from mimjax.data import ops


def test_select_is_tf_where_for_a_same_shape_or_scalar_condition():
  x = tf.random.stateless_uniform([7, 9, 3], [0, 1])
  y = 1.0 - x
  np.testing.assert_array_equal(ops.select(x > 0.5, x, y), tf.where(x > 0.5, x, y))
  np.testing.assert_array_equal(ops.select(tf.constant(False), x, y), y)


def test_luma_is_the_itu_601_weighted_sum():
  x = np.random.default_rng(0).uniform(0, 255, (5, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(ops.luma(tf.constant(x)).numpy(),
                             x @ np.array([0.299, 0.587, 0.114])[:, None], rtol=1e-6)


def test_case_runs_the_chosen_branch_in_a_graph_and_eagerly():
  branches = [lambda i=i: tf.constant(float(i)) for i in range(4)]
  graph = tf.function(lambda index: ops.case(index, branches))
  for index in range(4):
    assert graph(tf.constant(index)).numpy() == index
    assert ops.case(tf.constant(index), branches).numpy() == index
  # One Case op, marked not to be lowered to Switch/Merge (the point of ops.case).
  graph_def = graph.get_concrete_function(tf.TensorSpec([], tf.int32)).graph.as_graph_def()
  (case,) = [n for n in graph_def.node if n.op in ('Case', 'StatelessCase')]
  assert case.attr['_lower_using_switch_merge'].b is False


def test_case_does_not_run_the_branches_not_taken():
  # A branch that would fail (a runtime assertion) is not run when another is chosen, in tf.data.
  def failing(i):
    with tf.control_dependencies([tf.debugging.assert_less(i, tf.constant(0, tf.int64))]):
      return tf.constant(-1.0)

  ds = tf.data.Dataset.range(3).map(lambda i: ops.case(i % 2, [lambda: tf.constant(1.0),
                                                               lambda: tf.constant(2.0)]))
  assert list(ds.as_numpy_iterator()) == [1.0, 2.0, 1.0]
  ds = tf.data.Dataset.range(3).map(
      lambda i: ops.case(tf.constant(0), [lambda: tf.constant(1.0), lambda: failing(i)]))
  assert list(ds.as_numpy_iterator()) == [1.0] * 3
  ds = tf.data.Dataset.range(3).map(
      lambda i: ops.case(tf.constant(1), [lambda: tf.constant(1.0), lambda: failing(i)]))
  with pytest.raises(tf.errors.InvalidArgumentError):  # the check: it fails when chosen
    list(ds.as_numpy_iterator())
