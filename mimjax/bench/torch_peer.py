"""PyTorch peers of mimjax's MAE and supervised train steps, run by `mimjax.bench` as a worker.

`--task mae`, the same model and step as mimjax's MAE: a timm ViT encoder (`PatchEmbed`, `Block`s
with qkv bias, LayerNorm eps 1e-6, fixed sin-cos position embeddings, a cls token) on a random 25%
of the patches, the MAE decoder (embedding, mask tokens, `Block`s on all patches, prediction) and
the normalised per-patch pixel loss on the masked patches, then an AdamW update. Written from the
papers' text. `--task supervised`, DeiT's step: timm's `VisionTransformer` (cls-token head, drop
path) on a timm `Mixup` batch (mixup / cutmix, label smoothing) with soft-target cross-entropy,
then an AdamW update.

It runs in its own process because torch and TensorFlow (imported by mimjax's data modules) cannot
share one. Protocol on stdin / stdout, one JSON object per line: after start-up the worker writes
{"ready": true, "build_s": ...}; each line "K" read from stdin runs K steps and answers
{"times": [seconds per step]}; an empty line or EOF ends it. Errors are reported as {"error": ...}.
"""
import functools
import json
import sys
import time
import traceback

from absl import flags
import numpy as np
import torch
from timm import data as timm_data
from timm import loss as timm_loss
from timm.models import vision_transformer as tv
from torch import nn

from mimjax.bench import cli
from mimjax.models import posemb


def _blocks(width, depth, heads, mlp_ratio):
  norm = functools.partial(nn.LayerNorm, eps=1e-6)
  return nn.ModuleList([tv.Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                        for _ in range(depth)])


class TorchMAE(nn.Module):
  """MAE with timm blocks; forward(images [B, C, H, W]) -> scalar loss."""

  def __init__(self, a):
    super().__init__()
    grid = a.image_size // a.patch_size
    self.patch_size, self.num_patches = a.patch_size, grid * grid
    self.num_kept = int(self.num_patches * (1 - a.mask_ratio))
    self.patch_embed = tv.PatchEmbed(a.image_size, a.patch_size, a.channels, a.width)
    self.cls_token = nn.Parameter(torch.randn(1, 1, a.width) * 0.02)
    self.register_buffer('pos', torch.tensor(posemb.sincos_2d(grid, a.width),
                                             dtype=torch.float32)[None])
    self.blocks = _blocks(a.width, a.depth, a.heads, a.mlp_dim / a.width)
    self.norm = nn.LayerNorm(a.width, eps=1e-6)
    self.decoder_embed = nn.Linear(a.width, a.decoder_width)
    self.mask_token = nn.Parameter(torch.randn(1, 1, a.decoder_width) * 0.02)
    self.register_buffer('decoder_pos', torch.tensor(posemb.sincos_2d(grid, a.decoder_width),
                                                     dtype=torch.float32)[None])
    self.decoder_blocks = _blocks(a.decoder_width, a.decoder_depth, a.decoder_heads,
                                  a.decoder_mlp_ratio)
    self.decoder_norm = nn.LayerNorm(a.decoder_width, eps=1e-6)
    self.decoder_pred = nn.Linear(a.decoder_width, a.patch_size ** 2 * a.channels)

  def _patchify(self, images):
    b, c, h, w = images.shape
    p = self.patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, self.num_patches, p * p * c)

  def forward(self, images):
    b = images.shape[0]
    x = self.patch_embed(images) + self.pos
    order = torch.argsort(torch.rand(b, self.num_patches, device=images.device), dim=1)
    keep = order[:, :self.num_kept]
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    # In the decoder's dtype: under bf16 autocast `x` is bfloat16, and scatter needs one dtype.
    full = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1).clone()
    full = full.scatter(1, keep[..., None].expand(-1, -1, full.shape[-1]), x[:, 1:])
    x = torch.cat([x[:, :1], full + self.decoder_pos], dim=1)
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x)[:, 1:])
    target = self._patchify(images)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    mask = torch.ones(b, self.num_patches, device=images.device)
    mask.scatter_(1, keep, 0.0)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class TorchDeiT(nn.Module):
  """DeiT's supervised objective: forward(images, soft targets) -> soft-target cross-entropy."""

  def __init__(self, a):
    super().__init__()
    self.vit = tv.VisionTransformer(
        img_size=a.image_size, patch_size=a.patch_size, in_chans=a.channels,
        num_classes=a.num_classes, embed_dim=a.width, depth=a.depth, num_heads=a.heads,
        mlp_ratio=a.mlp_dim / a.width, qkv_bias=True, drop_path_rate=a.drop_path)
    self.loss = timm_loss.SoftTargetCrossEntropy()

  def forward(self, images, targets):
    return self.loss(self.vit(images), targets)


def _inputs(a):
  """The step's model inputs: fixed synthetic images (as mimjax's bench batch); for the supervised
  step, mixup / cutmix and smoothed targets redrawn each step, as mimjax's step does on device."""
  images = torch.randn(a.batch, a.channels, a.image_size, a.image_size, device=a.device)
  if a.task == 'mae':
    return lambda: (images,)
  mix = timm_data.Mixup(mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                        label_smoothing=a.label_smoothing, num_classes=a.num_classes)
  labels = torch.arange(a.batch, device=a.device) % a.num_classes
  return lambda: mix(images.clone(), labels)


def make_step(a):
  """(step function running one AdamW update, its module); `a.compile` runs the model (forward
  and backward, through AOTAutograd) under torch.compile, the optimizer eagerly."""
  torch.manual_seed(0)
  model = TorchMAE(a) if a.task == 'mae' else TorchDeiT(a)
  model.to(a.device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  inputs = _inputs(a)
  forward = torch.compile(model) if a.compile else model

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(a.device, torch.bfloat16, enabled=a.bf16):
      loss = forward(*inputs())
    loss.backward()
    opt.step()
    if a.device == 'cuda':
      torch.cuda.synchronize()
    return loss

  return step, model


def define_flags(flag_values):
  """The worker's flags (`mimjax.bench.cli`): the model sizes are required."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_enum('task', 'mae', ('mae', 'supervised'), 'Which step.', **fv)
  for name in ('batch', 'image_size', 'patch_size', 'width', 'depth', 'heads', 'mlp_dim'):
    flags.DEFINE_integer(name, None, f'{name} of the ViT', required=True, **fv)
  for name in ('decoder_width', 'decoder_depth', 'decoder_heads', 'decoder_mlp_ratio'):
    flags.DEFINE_integer(name, None, f'{name} of the MAE decoder (--task=mae)', **fv)
  flags.DEFINE_integer('channels', 3, 'Image channels.', **fv)
  flags.DEFINE_float('mask_ratio', 0.75, 'Fraction of patches masked (--task=mae).', **fv)
  flags.DEFINE_integer('num_classes', 1000, 'Classes (--task=supervised).', **fv)
  for name in ('drop_path', 'mixup_alpha', 'cutmix_alpha', 'label_smoothing'):
    flags.DEFINE_float(name, 0.0, f'{name} (--task=supervised)', **fv)
  flags.DEFINE_bool('compile', False, 'torch.compile the step.', **fv)
  flags.DEFINE_enum('device', 'cpu', ('cpu', 'cuda'), 'Torch device.', **fv)
  flags.DEFINE_bool('bf16', False, 'autocast to bfloat16 (mixed precision)', **fv)


def _build():
  """The torch build facts that decide CPU speed: CUDA version, MKL, oneDNN, OpenMP."""
  return (f'CUDA {torch.version.cuda or "none"}, MKL {torch.backends.mkl.is_available()}, '
          f'oneDNN {torch.backends.mkldnn.is_available()}, '
          f'OpenMP {torch.backends.openmp.is_available()}')


def _say(obj):
  sys.stdout.write(json.dumps(obj) + '\n')
  sys.stdout.flush()


def main(a):
  """Serves the protocol of the module docstring for parsed flags `a`."""
  try:
    start = time.perf_counter()
    step, model = make_step(a)
    _say(dict(ready=True, build_s=time.perf_counter() - start, torch=torch.__version__,
              torch_build=_build(), threads=torch.get_num_threads(),
              params=int(sum(np.prod(p.shape) for p in model.parameters()))))
    for line in sys.stdin:
      if not line.strip():
        break
      times = []
      for _ in range(int(line)):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
      _say(dict(times=times))
  except Exception:  # pylint: disable=broad-except
    _say(dict(error=traceback.format_exc(limit=3)[-2000:]))


if __name__ == '__main__':
  cli.run(define_flags, main)
