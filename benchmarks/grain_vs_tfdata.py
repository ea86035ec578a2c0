"""Grain against tf.data on MAE's `rrc_flip` work: images per CPU-second and wall img/s.

    pip install grain    # 0.2.18; not a mimjax dependency (see BENCHMARKS.md, Input pipeline)
    PYTHONPATH=. python3 benchmarks/grain_vs_tfdata.py [--images 1000] [--batches 6]

The same folder of synthetic JPEGs as `python -m mimjax.bench.input` (about 500x375, quality 90),
batches of 128 at 224 px, float32 normalised:
- tf.data: mimjax's pipeline (`pipeline.train_batches`, data.threads 1 or all cores);
- Grain + PIL: the torchvision recipe itself (PIL decode, RandomResizedCrop's box drawn from a
  generator seeded by (seed, index), PIL's antialiased bicubic resize of the box, flip, normalise),
  in Grain's MapDataset, batched by Grain; in process (one core) or 2 worker processes;
- Grain + TF ops: Grain calling mimjax's own `augment.rrc_flip` (a tf.function) per image.
CPU seconds are this process's and its children's (Grain's workers), so images per CPU-second is
a core's throughput whatever else loads the machine. Each measurement runs in a fresh process
(no other variant's threads beside it); variants alternate over rounds; the median.
"""
import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

from absl import flags
import grain.python as grain
import numpy as np
from PIL import Image
import psutil
import tensorflow as tf

from mimjax.bench import input as input_bench
from mimjax.data import augment
from mimjax.data import pipeline

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def cpu_seconds():
  """User + system CPU seconds of this process and its live children (Grain's workers)."""
  me = psutil.Process()
  total = 0.0
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.NoSuchProcess:
      pass
  return total


def rrc_box(rng, width, height, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params, numpy generator: (left, top, right, bottom)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
      return left, top, left + w, top + h
  w, h = width, height  # torchvision's central fallback
  if width / height < ratio[0]:
    h = round(width / ratio[0])
  elif width / height > ratio[1]:
    w = round(height * ratio[1])
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def pil_rrc_flip(index, path, seed=0, size=224):
  rng = np.random.default_rng([seed, index])
  with open(path, 'rb') as f:
    image = Image.open(io.BytesIO(f.read())).convert('RGB')
  image = image.resize((size, size), Image.BICUBIC, box=rrc_box(rng, *image.size))
  if rng.uniform() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return (np.asarray(image, np.float32) * (1 / 255) - MEAN) / STD


class TfRrcFlip:
  """mimjax's rrc_flip (the tf.data pipeline's per-image function) called from Grain."""

  def __init__(self, config):
    self.fn = tf.function(lambda data, index: augment.rrc_flip(
        augment.Encoded(data, (None, None, 3)),
        tf.stack([tf.constant(0, tf.int64), index]), config.data)['image'])

  def __call__(self, index, path):
    with open(path, 'rb') as f:
      return self.fn(tf.constant(f.read()), tf.constant(index, tf.int64)).numpy()


def grain_batches(paths, fn, batch, workers):
  """Endless Grain batches: in process on one reading thread (a per-core figure, as tf.data on
  one thread), or with `workers` processes."""
  ds = grain.MapDataset.source(paths).map_with_index(fn).batch(batch, drop_remainder=True)
  ds = ds.repeat().to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=batch))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(ds)


def measure(stream, batches, batch, warmup=2):
  for _ in range(warmup):
    next(stream)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(stream)
  images = batches * batch
  return images / (cpu_seconds() - cpu), images / (time.perf_counter() - start)


def variants(root, paths, batch):
  config = input_bench.bench_config(root, 'rrc_flip', batch, 1)
  return {
      'tf.data, 1 thread': lambda: pipeline.train_batches(config, 0, 0, 1),
      'tf.data, all cores': lambda: pipeline.train_batches(
          input_bench.bench_config(root, 'rrc_flip', batch, 0), 0, 0, 1),
      'Grain + PIL, in process': lambda: grain_batches(paths, pil_rrc_flip, batch, 0),
      'Grain + PIL, 2 workers': lambda: grain_batches(paths, pil_rrc_flip, batch, 2),
      'Grain + TF ops, in process': lambda: grain_batches(paths, TfRrcFlip(config), batch, 0),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--root', default='/tmp/mimjax_bench_images')
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--batches', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--variant', default='', help='(internal) measure this one and print JSON')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags (its defaults)
  batch = 128
  root = input_bench.write_folder(args.root, args.images)
  paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
  names = list(variants(root, paths, batch))
  if args.variant:
    print(json.dumps(measure(variants(root, paths, batch)[args.variant](), args.batches, batch)))
    return
  # Each measurement in a fresh process: no other variant's threads or workers run beside it.
  results = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      out = subprocess.run([sys.executable, __file__, '--root', root, '--images', str(args.images),
                            '--batches', str(args.batches), '--variant', name],
                           capture_output=True, text=True, check=True).stdout
      results[name].append(json.loads(out.strip().splitlines()[-1]))
  print(f'load average (1 min) at the end: {os.getloadavg()[0]:.2f}')
  for name, runs in results.items():
    per_cpu = statistics.median(r[0] for r in runs)
    wall = statistics.median(r[1] for r in runs)
    print(f'{name:28s} {per_cpu:6.1f} img per CPU-second   wall {wall:6.1f} img/s   (runs: '
          + ', '.join(f'{r[0]:.0f}' for r in runs) + ')')


if __name__ == '__main__':
  main()
