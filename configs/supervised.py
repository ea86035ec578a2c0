r"""Supervised ViT training, DeiT recipe (Touvron et al., 2021), optionally with MoTo / TokenProp.

  python -m mimjax.train --config configs/supervised.py:runlocal --workdir /tmp/sup
  python -m mimjax.train --config configs/supervised.py:runlocal,moto,tokenprop --workdir /tmp/mt
  python -m mimjax.train --config configs/supervised.py:model=S/16,moto --workdir gs://...

Arguments: model=<variant> (DeiT-S is S/16), epochs=<int> (300), moto (MoTo tokenizer, n = 8),
tokenprop (TokenProp reconstruction term, lambda = 1e-3), runlocal (Fashion-MNIST, a small ViT,
minutes on 2 CPU cores; test accuracy in WORKDIR/eval_supervised.json).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='S/16', epochs=300, moto=False, tokenprop=False,
                         runlocal=False)
  c = common.base_config()
  c.framework = 'supervised'
  c.model.variant = arg.model
  c.model.posemb = 'learn'
  c.model.cls_token = True
  c.model.pool = 'tok'
  c.model.drop_path = 0.1
  c.model.num_classes = 1000
  # timm's VisionTransformer as DeiT builds it: trunc_normal_(std=.02) on every Linear, the head
  # included, zero biases; the patch embedding keeps PyTorch's Conv2d default.
  c.model.weight_init = 'timm'
  c.model.head_init_std = 0.02
  c.model.tokenizer_norm = 'moto' if arg.moto else 'none'
  c.tokenprop.enabled = arg.tokenprop

  c.batch_size = 1024
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(5, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1e-3  # DeiT: 5e-4 per 512 images
  c.optim.lr_base_batch = 1024
  c.optim.min_lr = 1e-5
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05

  c.data.augment = 'deit'
  c.data.crop_scale = (0.08, 1.0)
  c.data.randaug_layers = 2  # rand-m9-mstd0.5-inc1
  c.data.randaug_magnitude = 9
  c.data.randaug_magnitude_std = 0.5
  c.data.random_erase = 0.25
  c.data.repeated_aug = 3  # DeiT main.py: RASampler, 3 repeats, on by default
  c.supervised.label_smoothing = 0.1
  c.supervised.mixup_alpha = 0.8
  c.supervised.cutmix_alpha = 1.0
  c.supervised.switch_prob = 0.5

  c.eval.every_steps = common.steps_for_epochs(10, 'imagenet2012', c.batch_size)
  c.log.images_every_steps = 0
  if arg.runlocal:
    common.apply_runlocal(c)
    c.model.num_classes = 10
    c.model.drop_path = 0.0
    c.optim.base_lr = 8e-3  # peak 1e-3 at batch 128: short runs need the full DeiT peak lr
    c.data.crop_scale = (0.35, 1.0)
    c.eval.every_steps = 500
    c.eval.batch_size = 500
    c.data.repeated_aug = 1  # a pass over the data per 3 epochs is too few for a 1500-step run
    c.tokenprop.hidden = 64  # the paper's 256 dominates the step time of a pico ViT on a CPU
    c.tokenprop.output_size = 28  # 4 x the 7 x 7 grid: the 28-px image itself, no resizing
    c.log.images_every_steps = 0
  common.apply_moto_stem(c)  # MoTo's stem per size (recipe_lib.MOTO_STEM)
  c.lock()
  return c
