"""Analytic FLOP counts of ViT passes, to cross-check XLA's cost analysis of a train step.

Each framework and plug-in states the passes of its own step (`Framework.step_flops`,
`Plugin.flop_terms`) with these functions.

A multiply-add counts as 2 FLOPs. Only matrix products are counted (dense layers, the patch
embedding and the two attention products); norms, softmax, GELU and the optimizer are left out,
so XLA's count of a whole step is expected a little above these numbers. A training pass
(forward + backward) costs `TRAIN_FACTOR` forward passes: the backward pass of a product needs the
gradients of both its operands, two products of the same size.
"""
TRAIN_FACTOR = 3


def dense(tokens, d_in, d_out):
  """[tokens, d_in] @ [d_in, d_out]."""
  return 2 * tokens * d_in * d_out


def attention(tokens, width):
  """softmax(q k^T) v summed over heads: two [T, T] x width products (head count cancels)."""
  return 2 * 2 * tokens * tokens * width


def block(tokens, width, mlp_dim):
  """One pre-norm transformer block: q, k, v and out projections, attention, two-layer MLP."""
  return (dense(tokens, width, 3 * width) + attention(tokens, width) + dense(tokens, width, width)
          + dense(tokens, width, mlp_dim) + dense(tokens, mlp_dim, width))


def transformer(tokens, width, depth, mlp_dim):
  """Forward FLOPs of `depth` blocks on `tokens` tokens per example."""
  return depth * block(tokens, width, mlp_dim)


def patch_embedding(num_patches, patch_size, channels, width):
  """The stride-p patch convolution as a [N, p*p*C] @ [p*p*C, width] product."""
  return dense(num_patches, patch_size * patch_size * channels, width)


def encoder(kw, channels, tokens):
  """Forward FLOPs per example of a mimjax ViT (`vit.encoder_kwargs`) that embeds all patches
  and runs `tokens` patch tokens (plus its cls token) through the blocks."""
  num_patches = (kw['image_size'] // kw['patch_size']) ** 2
  return (patch_embedding(num_patches, kw['patch_size'], channels, kw['width'])
          + transformer(tokens + int(kw['cls_token']), kw['width'], kw['depth'], kw['mlp_dim']))


def mae_decoder(mae_config, enc_width, num_patches, out_dim, num_prefix):
  """Forward FLOPs per example of the MAE decoder: embedding, blocks on all patches, prediction."""
  width = mae_config.decoder_width
  return (dense(num_patches + num_prefix, enc_width, width)
          + transformer(num_patches + num_prefix, width, mae_config.decoder_depth,
                        width * mae_config.decoder_mlp_ratio)
          + dense(num_patches, width, out_dim))
