"""Per-image cost of the crop resize: the same random-resized crops of 500x375 images resized to
224 bicubic by tf.image.resize without and with antialiasing and by mimjax's banded resize
(`augment.resize`, antialiased, the pipeline's), alternated, 7 rounds; median ms per image."""
import statistics
import time
import numpy as np
import tensorflow as tf
from mimjax.data import augment

rng = np.random.RandomState(0)
images = [tf.constant(rng.randint(0, 256, (375, 500, 3), np.uint8)) for _ in range(8)]
crops = [augment._crop(im, tf.constant([i, 1], tf.int64), (0.08, 1.0), (3 / 4, 4 / 3))
         for i, im in enumerate(images * 16)]

def make(aa):
  @tf.function(reduce_retracing=True)
  def f(x):
    return tf.image.resize(tf.cast(x, tf.float32), (224, 224), 'bicubic', antialias=aa)
  return f

fns = {'tf.image, antialias=False': make(False), 'tf.image, antialias=True': make(True),
       'banded (augment.resize)': tf.function(lambda x: augment.resize(x, 224),
                                              reduce_retracing=True)}
for f in fns.values():
  for c in crops[:8]:
    f(c)
times = {name: [] for name in fns}
for _ in range(7):
  for aa, f in fns.items():
    t = time.perf_counter()
    for c in crops:
      f(c).numpy()
    times[aa].append((time.perf_counter() - t) / len(crops) * 1e3)
for aa in fns:
  print(f'{aa}: median {statistics.median(times[aa]):.2f} ms/image '
        f'(rounds {", ".join(f"{t:.2f}" for t in times[aa])})')
