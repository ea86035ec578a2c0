r"""Feature-distillation MIM (BEiT v2 / FD-CLIP style), optionally with Dynamic Token Morphing.

The DTM recipe as its authors ran it (naver-ai/dtm `run_pretrain_dtm.py` + `docs/Training.md`;
ImageNet-1k, CLIP ViT-B/16 teacher, 300 epochs): BEiT v2 backbone (relative position bias per
block and shared, no absolute position embedding, BEiT init), lr 1.5e-3 * sqrt(batch / 2048),
colour jitter before the crop, 75 masked patches, CLIP fed ImageNet-normalised pixels unchanged,
2 morphing schedules per 128-example shard. docs/recipes.md lists every value, the paper's
and the reference code's, and why they differ.

  python -m mimjax.train --workdir DIR \
    --config configs/distill.py:model=B/16,dtm,clip_path=/data/clip/ViT-B-16.pt
  python -m mimjax.train --config configs/distill.py:runlocal,dtm --workdir /tmp/dtm

Arguments: model=<variant>, epochs=<int>, dtm (turn on Dynamic Token Morphing), teacher=clip|
checkpoint|ema, clip_path=<local CLIP checkpoint>, teacher_workdir=<mimjax workdir>, runlocal
(Fashion-MNIST, pico ViT, EMA teacher unless teacher=checkpoint; minutes on 2 CPU cores).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='B/16', epochs=300, dtm=False, teacher='clip', clip_path='',
                         teacher_workdir='', runlocal=False)
  c = common.base_config()
  c.framework = 'distill'
  c.model.variant = arg.model
  c.model.posemb = 'none'  # the reference's use_abs_pos_emb=False: relative position bias only
  c.model.rel_pos = 'both'
  c.model.weight_init = 'beit'
  c.model.layerscale = 1e-5 if arg.model.startswith(('L/', 'H/')) else 0.1
  c.model.drop_path = 0.0
  c.data.augment = 'beit'
  c.data.crop_scale = (0.08, 1.0)
  c.batch_size = 1024
  c.total_steps = common.steps_for_epochs(arg.epochs, 'imagenet2012', c.batch_size)
  c.warmup_steps = common.steps_for_epochs(10, 'imagenet2012', c.batch_size)
  c.optim.base_lr = 1.5e-3  # the reference's --lr, scaled by sqrt(batch / 2048): 1.06e-3 at 1024
  c.optim.lr_base_batch = 2048
  c.optim.lr_scaling = 'sqrt'
  c.optim.warmup_init_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.98
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 3.0
  c.distill.teacher = arg.teacher
  c.distill.clip_path = arg.clip_path or None
  c.distill.teacher_workdir = arg.teacher_workdir or None
  c.distill.teacher_own_norm = False  # the reference feeds CLIP the ImageNet-normalised pixels
  c.distill.mask_ratio = 0.4
  c.distill.mask_count = 75
  c.distill.loss = 'cosine'
  c.dtm.enabled = arg.dtm
  c.dtm.scheduler = 'reference'
  c.dtm.min_tokens = 0  # n1 = N = 196
  c.dtm.schedule_groups = 8  # one draw per GPU of the reference's 8
  if arg.runlocal:
    common.apply_runlocal(c)
    c.data.augment = 'rrc_flip'
    c.optim.base_lr = 1e-3
    c.optim.lr_base_batch = c.batch_size
    c.distill.mask_count = 0  # 40% of the 49 patches
    c.distill.mask_min_block = 4
    c.distill.ema_momentum = 0.99
    if arg.teacher == 'clip':
      c.distill.teacher = 'ema'
  c.lock()
  return c
