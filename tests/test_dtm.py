"""Dynamic Token Morphing: morphing matrix, scheduler and loss against hand-worked and loop-based
references."""
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import losses
from mimjax.plugins import dtm


def reference_groups(tokens, rounds, protect_first=True):
  """Plain-Python bipartite soft matching, written from the procedure's description."""
  groups = [[i] for i in range(len(tokens))]
  for r in rounds:
    t = len(groups)
    r = min(r, (t - int(protect_first)) // 2)
    if r <= 0:
      continue
    feats = [tokens[g].mean(0) for g in groups]
    unit = [f / np.linalg.norm(f) for f in feats]
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    best = []
    for i in a_pos:
      sims = [float(unit[i] @ unit[j]) for j in b_pos]
      best.append((max(sims), b_pos[int(np.argmax(sims))]))
    scores = [s for s, _ in best]
    if protect_first:
      scores[0] = -np.inf
    merged = sorted(range(len(a_pos)), key=lambda i: -scores[i])[:r]
    new_b = {j: list(groups[j]) for j in b_pos}
    for i in merged:
      new_b[best[i][1]] += groups[a_pos[i]]
    groups = [groups[a_pos[i]] for i in range(len(a_pos)) if i not in merged] + \
             [new_b[j] for j in b_pos]
  return groups


def matrix_from_groups(groups, n):
  s = np.zeros((n, n))
  for g in groups:
    s[np.ix_(g, g)] = 1.0 / len(g)
  return s


def effective_merges(n, rounds, protect_first=True):
  t = n
  for r in rounds:
    t -= max(0, min(r, (t - int(protect_first)) // 2))
  return n - t


def test_hand_worked_two_rounds():
  # Round 1 (t=6): A = {0, 2, 4}, B = {1, 3, 5}; token 0 is protected; token 4 = (.1, 1) is the
  # closest A/B pair (to 1), so 4 merges into 1. Sequence becomes [0, 2, {1,4}, 3, 5].
  # Round 2 (t=5): A = {0, {1,4}, 5}, B = {2, 3}; {1,4} has mean (.05, 1), cos to 2 = .149; 5 has
  # best cos 0 (to 3). So {1,4} merges into 2: groups {0}, {1,2,4}, {3}, {5}.
  tokens = jnp.array([[[1, 0], [0, 1], [1, .1], [-1, 0], [.1, 1], [0, -1]]], jnp.float32)
  s1 = np.asarray(dtm.morph_matrix(tokens, jnp.array([1, 0])))[0]
  np.testing.assert_allclose(s1, matrix_from_groups([[0], [1, 4], [2], [3], [5]], 6))
  s2 = np.asarray(dtm.morph_matrix(tokens, jnp.array([1, 1])))[0]
  np.testing.assert_allclose(s2, matrix_from_groups([[0], [1, 2, 4], [3], [5]], 6), atol=1e-7)
  # Rounds with r = 0 in between change nothing (not even the order of the sequence).
  s3 = np.asarray(dtm.morph_matrix(tokens, jnp.array([1, 0, 0, 1])))[0]
  np.testing.assert_allclose(s3, s2, atol=1e-7)


@pytest.mark.parametrize('protect_first', [True, False])
def test_matches_loop_reference(protect_first):
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(3, 25, 8)).astype(np.float32)
  fn = jax.jit(lambda x, r: dtm.morph_matrix(x, r, protect_first))
  for rounds in ([3, 3, 3, 0], [12, 6, 0, 2], [1, 1, 1, 1], [0, 0, 0, 0], [30, 30, 30, 30]):
    s = np.asarray(fn(tokens, jnp.array(rounds)))
    for b in range(3):
      expected = matrix_from_groups(reference_groups(tokens[b], rounds, protect_first), 25)
      np.testing.assert_allclose(s[b], expected, atol=1e-6, err_msg=f'rounds={rounds} b={b}')


def test_matrix_invariants():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(4, 49, 16)), jnp.float32)
  for rounds in ([5, 5, 5, 5, 0, 0], [24, 12, 6, 3, 1, 1], [0, 0, 0, 0, 0, 7]):
    s = np.asarray(dtm.morph_matrix(tokens, jnp.array(rounds)), np.float64)
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(s, np.swapaxes(s, 1, 2), atol=0)
    np.testing.assert_allclose(s @ s, s, atol=1e-6)
    # Each group contributes one eigenvalue 1: trace(S) = number of groups.
    groups = np.trace(s, axis1=1, axis2=2)
    np.testing.assert_allclose(groups, 49 - effective_merges(49, rounds), atol=1e-4)


def test_no_recompilation_across_schedules():
  fn = jax.jit(dtm.morph_matrix)
  tokens = jnp.ones((2, 16, 4)) + jnp.arange(16.0)[None, :, None] * jnp.arange(4.0)
  for rounds in ([0, 0, 0], [1, 2, 3], [7, 0, 1], [8, 8, 8]):
    fn(tokens, jnp.array(rounds, jnp.int32)).block_until_ready()
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  loss_fn = jax.jit(dtm.dtm_loss)
  for seed in range(3):
    r = dtm.sample_schedules(jax.random.PRNGKey(seed), 16, 2, 3)
    loss_fn(tokens, tokens * 2, r).block_until_ready()
  assert loss_fn._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize('scheme', ['paper', 'reference'])
def test_scheduler(scheme):
  n_tokens, max_rounds, min_tokens = 196, 14, 1
  r = np.asarray(dtm.sample_schedules(jax.random.PRNGKey(0), n_tokens, 4000, max_rounds,
                                      min_tokens, scheme))
  assert r.shape == (4000, max_rounds) and r.min() >= 0
  total = r.sum(1)
  assert total.max() <= n_tokens - min_tokens
  for row, tot in zip(r[:500], total[:500]):
    k = int(np.flatnonzero(row).max()) + 1 if tot else 0  # rounds up to the last active one
    assert (row[k:] == 0).all()
    if scheme == 'paper' and k:
      # eq. (1): rounds 1..k-1 remove floor(n/k) (0 when n < k); round k takes the remainder.
      base = tot // k
      assert (row[:k - 1] == base).all() and row[k - 1] == tot - (k - 1) * base
    if scheme == 'reference' and k:
      assert (row[:k] == row[0]).all()
  # n ~ U{0..195} has mean 97.5; the paper's scheme removes exactly n.
  if scheme == 'paper':
    assert abs(total.mean() - 97.5) < 3
  assert ((r > 0).sum(1) == max_rounds).any()


@pytest.mark.parametrize('distance', losses.DISTANCES)
@pytest.mark.parametrize('masked', [False, True])
def test_no_merge_equals_token_wise(distance, masked):
  rng = np.random.default_rng(2)
  pred = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(3, 16, 8)) * 3, jnp.float32)
  mask = jnp.asarray(rng.random((3, 16)) < 0.4) if masked else None
  # min_tokens = N: every schedule removes nothing.
  schedules = dtm.sample_schedules(jax.random.PRNGKey(0), 16, 2, 14, min_tokens=16)
  assert int(schedules.sum()) == 0
  for norm_target in (False, True):
    got = dtm.dtm_loss(pred, target, schedules, distance, mask, norm_target)
    want = losses.feature_loss(pred, target, distance, mask, norm_target)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_token_distances_by_hand():
  p = jnp.array([[[3.0, 4.0]]])
  t = jnp.array([[[0.0, 5.0]]])
  np.testing.assert_allclose(losses.token_distance(p, t, 'cosine'), [[1 - 20 / 25]], rtol=1e-6)
  np.testing.assert_allclose(losses.token_distance(p, t, 'l1'), [[(3 + 1) / 2]])
  np.testing.assert_allclose(losses.token_distance(p, t, 'l2'), [[(9 + 1) / 2]])
  # |d| = 3 >= beta = 2: 3 - 1; |d| = 1 < 2: 0.5 * 1 / 2.
  np.testing.assert_allclose(losses.token_distance(p, t, 'smooth_l1'), [[(2 + 0.25) / 2]])


def test_full_merge_is_image_level():
  rng = np.random.default_rng(3)
  pred = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  rounds = jnp.array([[8, 4, 2, 1]])  # 16 -> 8 -> 4 -> 2 -> 1 token without protection
  s = dtm.morph_matrix(target, rounds[0], protect_first=False)
  np.testing.assert_allclose(s, np.full((2, 16, 16), 1 / 16), rtol=1e-6)
  got = dtm.dtm_loss(pred, target, rounds, protect_first=False)
  want = losses.token_distance(pred.mean(1, keepdims=True), target.mean(1, keepdims=True)).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradient_reaches_predictions_only():
  rng = np.random.default_rng(4)
  pred = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  schedules = jnp.array([[3, 3, 0], [5, 2, 1]])
  g_pred, g_target = jax.grad(dtm.dtm_loss, argnums=(0, 1))(pred, target, schedules)
  assert float(jnp.abs(g_pred).sum()) > 0
  assert float(jnp.abs(g_target).sum()) == 0


def reference_matching_r(num_merge, matching_iter, n1):
  """The per-round merge count of naver-ai/dtm's engine_for_dtm.py, transcribed in plain Python."""
  if math.ceil(num_merge / matching_iter) * matching_iter > n1:
    return math.floor(num_merge / matching_iter)
  return math.ceil(num_merge / matching_iter)


def test_reference_scheduler_matches_the_reference_loop_at_n1_196():
  """min_tokens=0 is n1 = N = 196: every (n, k) the reference can draw gives its rounds, and the
  drawn n covers the reference's U{0..196}, k its U{1..14}."""
  py_rng = random.Random(0)
  draws = [(py_rng.randint(0, 196), py_rng.randint(1, 14)) for _ in range(5000)]
  n, k = np.array(draws).T
  got = np.asarray(dtm.schedule_rounds(n, k, 196, 14, 'reference'))
  for (num_merge, iters), row in zip(draws, got):
    r = reference_matching_r(num_merge, iters, 196)
    np.testing.assert_array_equal(row, [r] * iters + [0] * (14 - iters))
  r = np.asarray(dtm.sample_schedules(jax.random.PRNGKey(0), 196, 20000, 14, 0, 'reference'))
  assert r.shape == (20000, 14)
  counts = (r > 0).sum(1)
  assert counts.max() == 14 and (counts == 0).any()
  # n = 196 in k = 1 round asks for 196 merges: only possible when n1 = 196 (min_tokens = 0).
  assert (r[:, 0] == 196).any()


def test_group_means_equal_the_morphing_matrix():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 25, 6)), jnp.float32)
  groups = dtm.morph_groups(x, jnp.array([4, 3, 2, 0]))
  dense = np.einsum('bij,bjd->bid', np.asarray(dtm.group_matrix(groups), np.float64),
                    np.asarray(x, np.float64))
  np.testing.assert_allclose(dtm.group_means(x, groups), dense, atol=1e-6)


def test_per_group_schedules_differ_and_compile_once():
  rng = np.random.default_rng(6)
  pred = jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32)
  schedules = dtm.sample_schedules(jax.random.PRNGKey(0), 16, 2, 3, groups=4)
  assert schedules.shape == (4, 2, 3)
  assert len({tuple(np.asarray(s).ravel()) for s in schedules}) > 1  # shards draw differently
  loss_fn = jax.jit(lambda p, t, s: dtm.dtm_loss(p, t, s))  # a jit cache of its own
  got = loss_fn(pred, target, schedules)
  # Each group of 2 consecutive examples under its own schedules; the mean of the group losses.
  want = np.mean([dtm.dtm_loss(pred[2 * g:2 * g + 2], target[2 * g:2 * g + 2], schedules[g])
                  for g in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for seed in range(1, 4):
    loss_fn(pred, target, dtm.sample_schedules(jax.random.PRNGKey(seed), 16, 2, 3, groups=4))
  assert loss_fn._cache_size() == 1  # pylint: disable=protected-access


def test_merge_rounds_do_no_per_feature_work():
  """The rounds read dot products of tokens ([N, N]), never the [N, D] features: nothing inside
  the loop over rounds has a feature-sized axis, so a round costs the same at any width D."""
  n, d = 10, 7  # D differs from every size of the rounds' own arrays (N, N / 2, rounds)
  jaxpr = jax.make_jaxpr(dtm.morph_groups)(jnp.ones((2, n, d)), jnp.zeros(4, jnp.int32))

  def shapes_in(eqns, in_loop):
    for eqn in eqns:
      if in_loop:
        yield from (tuple(v.aval.shape) for v in [*eqn.invars, *eqn.outvars]
                    if hasattr(v.aval, 'shape'))
      loop = in_loop or eqn.primitive.name in ('while', 'scan')
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from shapes_in(sub.eqns, loop)

  shapes = set(shapes_in(jaxpr.jaxpr.eqns, False))
  assert (2, n, n) in shapes  # the loop was found: it reads the [B, N, N] dot products
  assert not any(d in s for s in shapes), shapes
