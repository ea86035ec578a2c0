r"""Input-pipeline benchmark: images/s of each augmentation and time to first batch after a resume.

  python -m mimjax.bench.input                       # 2,000 synthetic JPEGs, 224 px, all cores
  python -m mimjax.bench.input --images 500 --batches 4 --out input.json   # smoke run

It writes a synthetic ImageNet-like folder (JPEG quality 90, sizes drawn around 500x375, 10 class
folders; reused when present), then for each augmentation reads training batches through the real
pipeline (`mimjax.data.pipeline.train_batches`, image-folder source) with tf.data on one thread
and on all cores. Each is reported as images per CPU-second of the process (all its threads: a
core's throughput, barely affected by other jobs sharing the machine) and, labelled, as images per
wall-clock second (what the machine delivered under its load); the 1-minute load average at the
start and end is recorded beside them. Resume: time to the first batch at the positions of steps
0, 10k and 100k (simulated: only the data position changes).
"""
import json
import os
import platform
import resource
import time

from absl import flags
import numpy as np
from PIL import Image

from mimjax import recipe_lib
from mimjax.bench import cli
from mimjax.data import pipeline

AUGMENTATIONS = ('rrc_flip', 'deit', 'lut_two_view', 'center')
RESUME_STEPS = (0, 10_000, 100_000)


def write_folder(root, num_images, seed=0):
  """`num_images` JPEGs (quality 90) of smooth random content, sizes around 500x375, in 10
  class folders; skipped when `root` already holds that many."""
  classes = [f'class_{c:02d}' for c in range(10)]
  if os.path.isdir(root) and sum(len(os.listdir(os.path.join(root, c))) for c in classes
                                 if os.path.isdir(os.path.join(root, c))) == num_images:
    return root
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    w = int(np.clip(rng.normal(500, 60), 200, 800))
    h = int(np.clip(rng.normal(375, 45), 150, 600))
    # Low-frequency colour field plus noise: compresses like a photo, not like flat colour.
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 8, (h, w, 3))
    pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    directory = os.path.join(root, classes[i % 10])
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(directory, f'{i:07d}.jpg'), quality=90)
  return root


def bench_config(root, augment, batch, threads, image_size=224):
  """The MAE recipe reading `root` with `augment` on `threads` tf.data threads (0 = all)."""
  config = recipe_lib.recipe_config('mae')
  with config.unlocked():
    config.data.name = root
    config.data.augment = augment
    config.data.image_size = image_size
    config.data.threads = threads
    config.data.folder_holdout = 0.0
    config.data.folder_holdout_min = 0
    config.batch_size = batch
  return config


def cpu_seconds():
  """CPU seconds (user + system) of this process, all its threads, and its waited-for children."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                        resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(config, batches, warmup=2):
  """(images per wall-clock second, images per CPU-second of this process) over `batches` training
  batches after `warmup` (pipeline start-up excluded).

  Images per CPU-second is what a core delivers, whatever else shares the machine (the wall rate
  drops when other jobs take the cores; the CPU seconds spent per image barely move), and it
  includes every thread's work: tf.data's, the batching and the copy out to numpy.
  """
  stream = pipeline.train_batches(config, 0, 0, 1)
  for _ in range(warmup):
    next(stream)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(stream)
  images = batches * config.batch_size
  return images / (time.perf_counter() - start), images / (cpu_seconds() - cpu)


def first_batch_seconds(config, step):
  """Seconds from building the stream at step `step`'s data position to its first batch."""
  start = time.perf_counter()
  next(pipeline.train_batches(config, step * config.batch_size, 0, 1))
  return time.perf_counter() - start


def run(root, num_images, batch, batches, image_size):
  write_folder(root, num_images)
  cores = os.cpu_count()
  results = {'machine': f'{platform.processor() or platform.machine()}, {cores} cores',
             'load_average_1min_at_start': os.getloadavg()[0],
             'images': num_images, 'batch': batch, 'image_size': image_size, 'throughput': {},
             'resume_first_batch_s': {}}
  for augment in AUGMENTATIONS:
    row = {}
    for threads, label in ((1, '1_thread'), (0, 'all_cores')):
      wall, per_cpu_s = throughput(bench_config(root, augment, batch, threads, image_size), batches)
      row[f'img_per_cpu_s_{label}'] = per_cpu_s
      row[f'wall_img_s_{label}'] = wall
    results['throughput'][augment] = row
    print(f'{augment:>13}: {row["img_per_cpu_s_1_thread"]:6.1f} img per CPU-second on 1 thread '
          f'(wall {row["wall_img_s_1_thread"]:6.1f} img/s); {cores} cores: '
          f'{row["img_per_cpu_s_all_cores"]:6.1f} img per CPU-second (wall '
          f'{row["wall_img_s_all_cores"]:6.1f} img/s)', flush=True)
  config = bench_config(root, 'rrc_flip', batch, 0, image_size)
  for step in RESUME_STEPS:
    seconds = first_batch_seconds(config, step)
    results['resume_first_batch_s'][step] = seconds
    print(f'resume at step {step:>7}: first batch after {seconds:.2f} s', flush=True)
  results['load_average_1min_at_end'] = os.getloadavg()[0]
  print(f'load average (1 min): {results["load_average_1min_at_start"]:.2f} at the start, '
        f'{results["load_average_1min_at_end"]:.2f} at the end', flush=True)
  return results


def define_flags(flag_values):
  """The command's flags (`mimjax.bench.cli`)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('root', '/tmp/mimjax_bench_images', 'Folder of the synthetic JPEGs (reused '
                      'when present).', **fv)
  flags.DEFINE_integer('images', 2000, 'Synthetic JPEGs to write.', **fv)
  flags.DEFINE_integer('batch', 128, 'Batch size.', **fv)
  flags.DEFINE_integer('batches', 10, 'timed batches per measurement', **fv)
  flags.DEFINE_integer('image_size', 224, 'Side of the augmented images in pixels.', **fv)
  flags.DEFINE_string('out', '', 'write the results here as JSON', **fv)


def main(args):
  """Runs the measurements for parsed flags `args`; returns the results."""
  results = run(args.root, args.images, args.batch, args.batches, args.image_size)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  cli.run(define_flags, main)
