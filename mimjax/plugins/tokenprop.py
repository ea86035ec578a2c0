"""TokenProp (Qian et al., eq. 7 and Table 16): reconstruct the image from the tokenizer's output.

A light convolutional decoder G maps the tokenizer's patch tokens (before position embedding and
the transformer blocks), laid out on their g x g grid, to an image; the L2 distance to the
encoder's input image resized to that resolution, times lambda = 1e-3, is added to the task loss.
The decoder is training-only: it lives in params['tokenprop'], never in params['encoder'].

Table 16, read row by row (the extracted table is ambiguous; these are the readings chosen):
- "Input w Concat, output size 16": the 196 tokens of a 224-px ViT/16 are concatenated into one
  spatial map ("transforms the split tokens into connected spatial feature maps", Sec. 6.3) and
  brought to 16 x 16, a quarter of the 64 x 64 output of Sec. 6.3 and Table 9; here the g x g
  grid is resized (bilinear) to `output_size / 4` when it differs (14 -> 16 at 224 px).
- "The convolutional layer denotes residual blocks": all four 3x3 layers are residual,
  shortcut(x) + conv3x3(x), the shortcut an identity or a 1x1 conv when the channel count
  changes; ReLU after each block except the output one (the target is a normalised image with
  negative values).
- Channels 256, 256, pixel shuffle to 64 (x2 size), 64, pixel shuffle to 16 (x2), 3: with
  `hidden` = 256 as printed. Pixel shuffles are depth-to-space with (row, col, channel) order.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mimjax import errors
from mimjax.frameworks import base


def pixel_shuffle(x, factor):
  """Depth-to-space [B, h, w, c * f * f] -> [B, h * f, w * f, c]."""
  b, h, w, c = x.shape
  c_out = c // (factor * factor)
  x = x.reshape(b, h, w, factor, factor, c_out).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * factor, w * factor, c_out)


class ResidualConv(nn.Module):
  """shortcut(x) + conv3x3(x), then ReLU if `activation`; the shortcut is a 1x1 conv only when
  channels change."""
  features: int
  activation: bool = True

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), name='shortcut')(x)
    y = shortcut + nn.Conv(self.features, (3, 3), padding='SAME', name='conv')(x)
    return nn.relu(y) if self.activation else y


class TokenPropDecoder(nn.Module):
  """Tokens [B, g*g, width] -> image [B, output_size, output_size, channels] (Table 16)."""
  grid_size: int
  channels: int = 3
  hidden: int = 256
  output_size: int = 64

  @nn.compact
  def __call__(self, tokens):
    b = tokens.shape[0]
    x = tokens.astype(jnp.float32).reshape(b, self.grid_size, self.grid_size, -1)
    side = self.output_size // 4
    if side != self.grid_size:
      x = jax.image.resize(x, (b, side, side, x.shape[-1]), 'bilinear')
    x = ResidualConv(self.hidden, name='block_0')(x)
    x = ResidualConv(self.hidden, name='block_1')(x)
    x = pixel_shuffle(x, 2)  # hidden / 4 = 64 channels at output_size / 2
    x = ResidualConv(self.hidden // 4, name='block_2')(x)
    x = pixel_shuffle(x, 2)  # hidden / 16 = 16 channels at output_size
    return ResidualConv(self.channels, activation=False, name='block_out')(x)


def reconstruction_loss(pred, images):
  """Mean squared error between `pred` [B, r, r, C] and `images` [B, H, W, C] resized to r x r.

  The target is the (normalised) input image, area-averaged (antialiased linear) down to the
  decoder's resolution.
  """
  target = jax.image.resize(images.astype(jnp.float32), pred.shape, 'linear', antialias=True)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


class TokenProp(base.Plugin):
  """lambda * ||G(tokenizer tokens) - resize(image)||^2, on any framework built on the mimjax ViT.

  Reads the tokenizer's output for all N patches (`outputs.encoder['tokenizer']`, also under MAE's
  masking) and the image the encoder saw (`outputs.image`, after mixup where the framework mixes).
  """
  name = 'tokenprop'

  def __init__(self, config, host):
    super().__init__(config, host)
    self.decoder = TokenPropDecoder(grid_size=host.grid_size,
                                    channels=config.data.channels, hidden=config.tokenprop.hidden,
                                    output_size=config.tokenprop.output_size)

  @classmethod
  def config_fields(cls):
    """`config.tokenprop`: the weight of the reconstruction term and its decoder."""
    s = ml_collections.ConfigDict()
    s.enabled = False  # reconstruct the image from the tokenizer output (Qian et al.)
    s.weight = 1e-3  # lambda of the reconstruction term
    s.hidden = 256  # channels of the decoder's two residual blocks
    s.output_size = 64  # side of the reconstruction (Table 16); the token grid is resized
    # to output_size / 4 first, and the target image to output_size
    return s

  @classmethod
  def enabled(cls, config):
    return config.tokenprop.enabled

  @classmethod
  def requires(cls, config):
    return {'tokenizer': "TokenProp decodes the tokenizer's output; use a framework built on the "
                         'mimjax ViT'}

  @classmethod
  def check_config(cls, config):
    if config.tokenprop.weight <= 0:
      raise errors.ConfigError(
          f'config.tokenprop.weight={config.tokenprop.weight}: TokenProp needs a positive weight '
          '(the paper uses 1e-3); set tokenprop.enabled=False to turn it off.')
    if config.tokenprop.hidden < 16 or config.tokenprop.hidden % 16:
      raise errors.ConfigError(
          f'config.tokenprop.hidden={config.tokenprop.hidden} must be a positive multiple of 16 '
          '(two x2 pixel shuffles divide the channels by 16); the paper uses 256.')
    if config.tokenprop.output_size % 4 or config.tokenprop.output_size < 4:
      raise errors.ConfigError(
          f'config.tokenprop.output_size={config.tokenprop.output_size} must be a positive '
          'multiple of 4 (two x2 pixel shuffles); the paper uses 64.')

  def init_params(self, rng, outputs):
    return self.decoder.init(rng, outputs.encoder['tokenizer'])['params']

  def loss(self, params, state, outputs, batch, rng, step, train):
    del state, batch, rng, step, train
    pred = self.decoder.apply({'params': params[self.name]}, outputs.encoder['tokenizer'])
    rec = reconstruction_loss(pred, outputs.image)
    return self.config.tokenprop.weight * rec, {'loss_tokenprop': rec}, None
