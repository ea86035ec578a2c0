"""A short supervised run with MoTo on Fashion-MNIST: periodic evaluation and the layout PNG."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import supervised as supervised_config
from mimjax import evaluate
from mimjax import train
from mimjax import visualize


@pytest.mark.slow  # about 2.5 minutes on 2 shared CPU cores
def test_short_moto_run_beats_chance_and_draws_its_layout(tmp_path):
  config = supervised_config.get_config('runlocal,moto')
  config.model.variant = 'mu/4'
  config.total_steps = 150
  config.warmup_steps = 20
  config.eval.every_steps = 75
  config.checkpoint.every_steps = 150
  config.log.progress_bar = False
  workdir = str(tmp_path)
  last = train.train(config, workdir)

  with open(os.path.join(workdir, 'eval_supervised.json')) as f:
    record = json.load(f)
  assert [r['step'] for r in record['history']] == [75, 150]
  assert record['final'] == record['history'][-1]
  assert record['best']['top1'] == max(r['top1'] for r in record['history'])
  assert last['eval_top1'] == record['final']['top1']
  # Fashion-MNIST has 10 balanced test classes: chance is 0.1 top-1 and 0.5 top-5. 150 steps of a
  # 1-block ViT under the full DeiT regularisation (mixup, cutmix, RandAugment, erasing) reach
  # about 0.23; 0.18 is far above chance over 10k examples and leaves room for seed noise.
  assert record['final']['top1'] > 0.18, record
  assert record['final']['top5'] > record['final']['top1']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert [r['step'] for r in logged if 'eval_top1' in r] == [75, 150]

  out = evaluate.evaluate(workdir, 'moto_layout')['picture']
  png = np.asarray(Image.open(out))
  assert png.shape == (8 * 114 + 2, 3 * 114 + 2, 3)  # 8 images, 28 px tiles enlarged 4x, 2 px gaps
  colours = png[2:-2, 116:228].reshape(-1, 3)  # the colour-map column (second), without padding
  colours = colours[np.any(colours != 255, axis=-1)]
  palette = {tuple(p) for p in visualize.PALETTE}
  assert {tuple(c) for c in colours} <= palette
