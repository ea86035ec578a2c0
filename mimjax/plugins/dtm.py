"""Dynamic Token Morphing (Kim, Heo, Han): compare student and teacher tokens as group means.

Teacher tokens are grouped by iterative bipartite soft matching (the token merging of Bolya et al.,
which the paper's reference code runs), and every token is replaced by the mean of its group on
both sides before the per-token distance. A random schedule per step (number of merges and rounds)
varies the grouping from token-wise (no merge) to nearly image-level.

Everything runs under `jax.jit` with fixed shapes: a schedule is an int32 vector of per-round merge
counts over a fixed maximum number of rounds (0 = inactive round), so changing it never recompiles.
"""
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax import losses
from mimjax.frameworks import base
from mimjax.models import vit

SCHEDULERS = ('paper', 'reference')


def _merge_round(carry, r, gram, protect_first):
  """One round of bipartite soft matching on one sample.

  carry: (seq [N] group id at each position (N = padding), t (current length), assign [N] group
  id of each original token). gram: [N, N] dot products of the original tokens.

  A group is the sum of its tokens (cosine is scale-invariant, so sums match as ToMe's
  size-weighted means), and dot products of sums are sums of `gram` entries: one one-hot [N, N]
  membership matrix and two small matrix products give every cosine of the round, so no [N, D]
  feature array is gathered, normalised or scattered per round.
  """
  seq, t, assign = carry
  n = seq.shape[0]
  n_a, n_b = (n + 1) // 2, n // 2
  # member[p, i] = 1 where original token i is in the group at sequence position p.
  member = (seq[:, None] == assign[None, :]).astype(jnp.float32)
  dots = jnp.dot(member, gram, precision=jax.lax.Precision.HIGHEST)  # <group at p, token i>
  inv_norm = jax.lax.rsqrt(jnp.maximum(jnp.sum(dots * member, -1), 1e-24))
  scores = jnp.einsum('ij,kj->ik', dots[0::2], member[1::2],
                      precision=jax.lax.Precision.HIGHEST)
  scores = scores * inv_norm[0::2, None] * inv_norm[None, 1::2]
  b_valid = 2 * jnp.arange(n_b) + 1 < t
  scores = jnp.where(b_valid[None], scores, -jnp.inf)
  node_max, node_idx = scores.max(-1), scores.argmax(-1)
  a_idx = jnp.arange(n_a)
  a_ok = 2 * a_idx < t
  if protect_first:
    a_ok &= a_idx > 0
  node_max = jnp.where(a_ok, node_max, -jnp.inf)
  r = jnp.clip(r, 0, (t - int(protect_first)) // 2)
  # The r A-tokens with the highest best-similarity merge (protected/padded ones sort last): the
  # rank of a stable descending sort, counted by comparisons instead of a sort and a scatter.
  ahead = (node_max[None, :] > node_max[:, None]) | (
      (node_max[None, :] == node_max[:, None]) & (a_idx[None, :] < a_idx[:, None]))
  merged = ahead.sum(-1) < r
  # Every token of a merged A group moves to its partner's group.
  g_a = seq[0::2]
  g_dst = seq[1::2][node_idx]
  moves = merged[:, None] & (assign[None, :] == g_a[:, None])
  assign = assign + jnp.sum(jnp.where(moves, (g_dst - g_a)[:, None], 0), 0, dtype=assign.dtype)
  # New order: unmerged A tokens in their order, then all B tokens; a round with r = 0 keeps all.
  pos = jnp.arange(n)
  is_a = pos % 2 == 0
  valid = pos < t
  keep_a = is_a & valid & ~merged[pos // 2]
  keep_b = ~is_a & valid
  new_pos = jnp.where(keep_a, jnp.cumsum(keep_a) - 1,
                      jnp.where(keep_b, keep_a.sum() + jnp.cumsum(keep_b) - 1, n))
  # new_seq[q] = seq[p] for the one p with new_pos[p] = q, else n (padding): a compare and a min
  # rather than a scatter.
  new_seq = jnp.min(jnp.where(new_pos[None, :] == pos[:, None], seq[None, :], n), -1)
  seq = jnp.where(r > 0, new_seq, seq)
  return seq, t - r, assign


def morph_groups(tokens, r_per_round, protect_first=True):
  """Group id of every token after the rounds of `r_per_round`, int32 [B, N].

  Group ids are token indices (the index of the group's surviving B token, or its own index).
  """
  tokens = jax.lax.stop_gradient(tokens).astype(jnp.float32)
  r_per_round = jnp.asarray(r_per_round, jnp.int32)
  n = tokens.shape[1]
  # Once per sample, shared by every round and, under a vmap over schedules, by every schedule.
  grams = jnp.einsum('bid,bjd->bij', tokens, tokens, precision=jax.lax.Precision.HIGHEST)

  def one(gram):
    idx = jnp.arange(n, dtype=jnp.int32)
    carry = (idx, jnp.int32(n), idx)
    # A rolled loop: unrolling the rounds (tried for GPU latency) made XLA:CPU's compile of the
    # vmapped, per-group loss take minutes and over 15 GB at 14 rounds.
    carry = jax.lax.fori_loop(
        0, r_per_round.shape[0],
        lambda k, c: _merge_round(c, r_per_round[k], gram, protect_first), carry)
    return carry[2]

  return jax.vmap(one)(grams)


def group_matrix(groups):
  """float32 [B, N, N] with S[b, i, j] = 1/|g| when tokens i and j share group g, else 0."""
  same = (groups[:, :, None] == groups[:, None, :]).astype(jnp.float32)
  return same / same.sum(-1, keepdims=True)


def morph_matrix(tokens, r_per_round, protect_first=True):
  """Morphing matrix of `tokens` [B, N, D] under the per-round merge counts `r_per_round` [K].

  Round k works on the current sequence of t merged tokens: positions 0, 2, 4, ... (set A) each find
  their most similar (cosine) token among positions 1, 3, 5, ... (set B); the min(r_k, (t-1)//2)
  A tokens with the highest similarity merge into their partners (position 0 never merges when
  `protect_first`; the bound is then t//2); the new sequence is the unmerged A tokens in order, then
  B. Returns S float32 [B, N, N]; `S @ x` replaces every token by its group mean.
  """
  return group_matrix(morph_groups(tokens, r_per_round, protect_first))


def schedule_rounds(n, k, n_max, max_rounds, scheme='paper'):
  """Per-round merge counts int32 [..., max_rounds] of schedules removing n tokens in k rounds.

  'paper' (eq. 1): floor(n / k) per round, the remainder in round k. 'reference' (the authors'
  code, with n1 = n_max): ceil(n / k) in each of the k rounds, or floor(n / k) when k * ceil(n / k)
  would exceed n_max. Rounds after k are 0 (inactive).
  """
  if scheme not in SCHEDULERS:
    raise ValueError(f'DTM scheduler {scheme!r} is unknown; use one of {SCHEDULERS}.')
  n, k = jnp.asarray(n)[..., None], jnp.asarray(k)[..., None]
  rounds = jnp.arange(max_rounds)
  if scheme == 'paper':
    base = n // k
    r = jnp.where(rounds < k - 1, base, jnp.where(rounds == k - 1, n - (k - 1) * base, 0))
  else:
    ceil = -(-n // k)
    per_round = jnp.where(ceil * k > n_max, n // k, ceil)
    r = jnp.where(rounds < k, per_round, 0)
  return r.astype(jnp.int32)


def sample_schedules(rng, num_tokens, num_schedules=2, max_rounds=14, min_tokens=1,
                     scheme='paper', groups=0):
  """Per-round merge counts, int32 [num_schedules, max_rounds] ([groups, num_schedules,
  max_rounds] when groups > 0: an independent draw for each group of examples).

  Each schedule removes n ~ U{0, ..., N - min_tokens} tokens in k ~ U{1, ..., max_rounds} rounds
  (see `schedule_rounds`); min_tokens = 0 is the reference code's n1 = N (196 at 224 / 16).
  """
  n_max = num_tokens - min_tokens
  shape = (groups, num_schedules) if groups else (num_schedules,)
  n_rng, k_rng = jax.random.split(rng)
  n = jax.random.randint(n_rng, shape, 0, n_max + 1)
  k = jax.random.randint(k_rng, shape, 1, max_rounds + 1)
  return schedule_rounds(n, k, n_max, max_rounds, scheme)


def group_means(x, groups):
  """x [B, N, D] with every token replaced by the mean of its group (`groups` int [B, N]).

  Equals `group_matrix(groups) @ x` in O(B N D) instead of a dense [B, N, N] product.
  """
  b, n = groups.shape
  seg = (groups + n * jnp.arange(b, dtype=groups.dtype)[:, None]).reshape(-1)
  sums = jax.ops.segment_sum(x.reshape(b * n, -1), seg, num_segments=b * n)
  counts = jax.ops.segment_sum(jnp.ones(b * n, x.dtype), seg, num_segments=b * n)
  return (sums / jnp.maximum(counts, 1)[:, None])[seg].reshape(x.shape)


def dtm_loss(pred, target, schedules, distance='cosine', mask=None, norm_target=False,
             protect_first=True):
  """Mean over schedules of the per-token distance between morphed predictions and targets.

  Args:
    pred: [B, N, D] student predictions.
    target: [B, N, D] teacher tokens (gradient stopped here); they also define the grouping.
    schedules: int32 [L, K] per-round merge counts (see `sample_schedules`), or [G, L, K]: the
      batch splits into G equal consecutive groups (e.g. data-parallel shards), each morphed with
      its own L schedules; the loss is the mean of the G group losses (as DDP averages the GPUs).
    distance: 'cosine' | 'smooth_l1' | 'l1' | 'l2' (see `losses.token_distance`).
    mask: optional bool [B, N]; average only over tokens where True (e.g. masked patches).
    norm_target: standardise every morphed target token (after morphing, as the reference code).

  The mean over tokens equals eq. (4)'s group-size-weighted sum over groups, up to the factor N.
  """
  pred = pred.astype(jnp.float32)
  target = jax.lax.stop_gradient(target).astype(jnp.float32)
  schedules = jnp.asarray(schedules)
  if schedules.ndim == 3:
    g = schedules.shape[0]
    if pred.shape[0] % g:
      raise errors.ConfigError(f'config.dtm.schedule_groups={g} does not divide the batch of '
                               f'{pred.shape[0]} examples; choose a divisor of it.')
    split = lambda x: None if x is None else x.reshape(g, -1, *x.shape[1:])  # noqa: E731
    per_group = lambda p, t, m, s: dtm_loss(p, t, s, distance, m, norm_target,  # noqa: E731
                                            protect_first)
    return jax.vmap(per_group)(split(pred), split(target), split(mask), schedules).mean()

  def one(r):
    groups = morph_groups(target, r, protect_first)
    return losses.feature_loss(group_means(pred, groups), group_means(target, groups), distance,
                               mask, norm_target)

  return jax.vmap(one)(schedules).mean()


class DTM(base.Plugin):
  """Replaces the host's token-wise feature loss by the DTM loss.

  Hosts put `feature_pred`, `feature_target` ([B, N, D]) and `feature_mask` (bool [B, N] or None)
  in their outputs: the distill framework and MAE with `mae.target = 'teacher'`. Loss options
  (distance, masked tokens only, target normalisation) are the host's `config.distill` ones, so
  DTM with no merges equals the host's own loss.
  """
  name = 'dtm'
  replaces_base_loss = True

  @classmethod
  def config_fields(cls):
    """`config.dtm`: the weight of the DTM loss (which replaces the token-wise loss of distill /
    mae+teacher) and its morphing schedules."""
    s = ml_collections.ConfigDict()
    s.enabled = False
    s.weight = 1.0  # weight of the DTM loss
    s.num_schedules = 2  # L: morphing schedules per step, losses averaged
    s.max_rounds = 14  # K: rounds k ~ U{1..K}
    # N-bar: merges drawn from U{0..N - min_tokens}; 0 = the reference code's n1 = N (196)
    s.min_tokens = 1
    s.scheduler = 'paper'  # paper (eq. 1: floor(n/k), remainder last) | reference (ceil(n/k))
    # G > 0: the batch splits into G equal groups, each with its own num_schedules draws (the
    # reference draws per GPU: 8 GPUs x 2 = 16 per step); 0 = one draw for the whole batch
    s.schedule_groups = 0
    s.protect_first = True  # the first token never merges away (reference code)
    return s

  @classmethod
  def enabled(cls, config):
    return config.dtm.enabled

  @classmethod
  def requires(cls, config):
    return {'teacher_features': 'DTM morphs teacher tokens: use config.framework="distill", or '
                                '"mae" with config.mae.target="teacher"'}

  @classmethod
  def check_config(cls, config):
    c = config.dtm
    errors.require(c.weight > 0, 'dtm.weight', c.weight,
                   'use a positive weight, or dtm.enabled=False to turn DTM off')
    if c.scheduler not in SCHEDULERS:
      raise errors.ConfigError(f'config.dtm.scheduler={c.scheduler!r}; use one of '
                               f'{SCHEDULERS}.')
    for key in ('num_schedules', 'max_rounds'):
      errors.require(c[key] >= 1, f'dtm.{key}', c[key], 'use a positive integer')
    errors.require(c.min_tokens >= 0, 'dtm.min_tokens', c.min_tokens,
                   'use >= 0 (0 = the reference code)')
    errors.require(c.schedule_groups >= 0, 'dtm.schedule_groups', c.schedule_groups,
                   'use >= 0 (0 = one draw for the whole batch)')
    num_tokens = vit.grid_size(config.model, config.data.image_size) ** 2
    if c.min_tokens > num_tokens:
      raise errors.ConfigError(f'config.dtm.min_tokens={c.min_tokens} exceeds the '
                               f'{num_tokens} tokens per image; use at most {num_tokens}.')
    micro_batch = config.batch_size // config.optim.accum_steps
    if c.schedule_groups and micro_batch % c.schedule_groups:
      raise errors.ConfigError(
          f'config.dtm.schedule_groups={c.schedule_groups} does not divide the batch of '
          f'{micro_batch} examples per step (batch_size / optim.accum_steps); choose a divisor.')

  def loss(self, params, state, outputs, batch, rng, step, train):
    del params, state, batch, step, train
    c, d = self.config.dtm, self.config.distill
    features = outputs.features
    num_tokens = features.pred.shape[1]
    schedules = sample_schedules(rng, num_tokens, c.num_schedules, c.max_rounds,
                                 c.min_tokens, c.scheduler, c.schedule_groups)
    loss = dtm_loss(features.pred, features.target, schedules, d.loss, features.mask,
                    d.norm_target, c.protect_first)
    metrics = {'loss_dtm': loss, 'dtm_merges': schedules.sum(-1).astype(jnp.float32).mean()}
    return c.weight * loss, metrics, None
