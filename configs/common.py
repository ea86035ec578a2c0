"""The one place that holds every config field and its default.

Framework configs (`configs/mae.py`, ...) start from `base_config()` and change values; they never
add keys. Because the returned ConfigDict is locked, a misspelt `--config.x.y=v` fails at start-up
naming the key. `runlocal` shrinks any config to a run that finishes on 2 CPU cores in minutes on
the offline default data (Fashion-MNIST).
"""
import ml_collections

IMAGENET_TRAIN_SIZE = 1_281_167

# Known dataset sizes, for turning a recipe in epochs into steps.
TRAIN_EXAMPLES = {
    'imagenet2012': IMAGENET_TRAIN_SIZE,
    'fashion_mnist': 60_000,
    'cifar10': 50_000,
    'imagenette': 9_469,
}


# An argument string item that makes `parse_arg` raise RecipeArguments: how --help lists each
# recipe's arguments without a second list to keep in step with the recipe.
ARGUMENTS_PROBE = '__arguments__'


class RecipeArguments(Exception):
  """Raised by `parse_arg` for ARGUMENTS_PROBE, carrying the recipe's argument defaults."""

  def __init__(self, defaults):
    super().__init__(defaults)
    self.defaults = defaults


def parse_arg(arg, **defaults):
  """Parses 'key=value,flag' strings from `--config file.py:ARG` into a ConfigDict.

  Only keys named in `defaults` are accepted; values are converted to the default's type, and a
  bare word sets a boolean default to True.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  if ARGUMENTS_PROBE in arg.split(','):
    raise RecipeArguments(defaults)
  for item in arg.split(','):
    if not item:
      continue
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(
          f'Unknown config argument {key!r}; this config accepts: {", ".join(sorted(defaults))}.')
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f'Config argument {key!r} needs a value, e.g. {key}={default}.')
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ('1', 'true', 'yes')
    elif default is None:
      result[key] = value
    else:
      result[key] = type(default)(value)
  return result


def steps_for_epochs(epochs, dataset, batch_size):
  """Number of optimizer steps in `epochs` passes over `dataset` at `batch_size`."""
  return max(1, int(round(epochs * TRAIN_EXAMPLES[dataset] / batch_size)))


def base_config():
  """Every field mimjax reads, with its default. Frameworks override values, never add keys."""
  c = ml_collections.ConfigDict()
  c.framework = 'mae'  # mae | simmim | distill | supervised
  c.seed = 0
  c.batch_size = 4096
  c.total_steps = 100_000
  c.warmup_steps = 10_000

  c.model = ml_collections.ConfigDict()
  c.model.variant = 'B/16'  # '<size>/<patch>', size in mimjax.models.vit.VARIANTS
  c.model.posemb = 'sincos2d'  # learn | sincos2d | none (e.g. with relative position bias only)
  # BEiT relative position bias: none | block (one table per block) | shared (one for all blocks)
  # | both (the DTM / BEiT v2 reference pre-training: each block adds its own and the shared one)
  c.model.rel_pos = 'none'
  # default (MAE: Xavier) | beit (BEiT: truncated normal 0.02, output projections of block l
  # divided by sqrt(2 l), zero biases, no key bias; SimMIM's ViT too) | timm (DeiT: trunc-normal
  # 0.02 on every Linear, zero biases)
  c.model.weight_init = 'default'
  c.model.cls_token = True
  c.model.pool = 'tok'  # tok | gap
  # True: no final norm on the tokens, a fresh LayerNorm of the pooled feature instead (MAE's
  # fine-tuning with global_pool, timm's fc_norm=True)
  c.model.fc_norm = False
  c.model.layerscale = 0.0  # initial value of layer scale; 0 turns it off
  c.model.drop_path = 0.0
  # Compute dtype: auto | float32 | bfloat16 | float16. auto = bfloat16 on TPU and GPUs of compute
  # capability >= 8.0, float16 on older GPUs (T4, V100: no bfloat16), float32 on CPU. float16 trains
  # with dynamic loss scaling (docs/gpu.md); params, softmax, norms, losses and optimizer state stay
  # float32 whatever the compute dtype.
  c.model.dtype = 'auto'
  c.model.remat = False  # rematerialise each block in the backward pass
  c.model.num_classes = 0  # classification head size; 0 = no head
  # head kernel init: 0 = zeros, else timm's trunc_normal_(std) (MAE's fine-tuning: 2e-5)
  c.model.head_init_std = 0.0
  c.model.tokenizer_norm = 'none'  # none (plain patch embedding) | moto (MoTo, Qian et al.)
  c.model.moto = ml_collections.ConfigDict()
  c.model.moto.entities = 8  # n, the number of soft semantic entities
  c.model.moto.stem_channels = 16  # c of the 3x3 conv stem before MoTo; 0 = MoTo on the image
  c.model.moto.stem_stride = 1  # s of that stem: MoTo at 1/s of the image side
  c.model.moto.key_dim = 16  # output channels of the 1x1 convs k and q
  c.model.moto.temperature = 0.1  # tau in L = softmax(tau * Z), multiplied as the paper writes it
  c.model.moto.eps = 1e-5  # added to the weighted standard deviation

  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'  # a TFDS name, or a path to an image folder (see README)
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.channels = 3  # grayscale images are replicated to 3 channels
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  # rrc_flip | simmim (its crop bilinear) | deit | center | lut_two_view (image + image2, LUT)
  # | beit (colour jitter, flip, crop)
  c.data.augment = 'rrc_flip'
  c.data.crop_scale = (0.2, 1.0)
  # 'deit' augmentation: RandAugment (timm's rand-m9-mstd0.5-inc1 by default) and random erasing.
  c.data.randaug_layers = 2  # ops applied per image (each with probability 0.5); 0 = off
  c.data.randaug_magnitude = 9  # on timm's 0..10 scale
  c.data.randaug_magnitude_std = 0.5  # Gaussian noise on the magnitude per op
  c.data.random_erase = 0.25  # probability of erasing one random box with per-pixel noise
  # Repeated augmentation (DeiT, Hoffer et al.): each training image this many times in a row,
  # each copy augmented differently; 1 = off.
  c.data.repeated_aug = 1
  c.data.eval_crop_fraction = 0.875  # evaluation: resize to size / fraction, then centre crop
  c.data.cache = False  # keep the raw (encoded) split in memory; for small datasets
  c.data.shuffle_buffer = 50_000
  # Image folder without train/ and val/ subfolders: in each class, max(this fraction of its
  # images, folder_holdout_min) are the eval split (those of lowest path hash, so adding images
  # moves few), the rest train; a class always keeps one image to train on.
  c.data.folder_holdout = 0.1
  c.data.folder_holdout_min = 10
  # Image folder: data.mean / data.std measured from (up to 1000 of) its training images at start,
  # replacing the recipe's values; False keeps data.mean / data.std as set.
  c.data.folder_stats = True
  c.data.threads = 0  # tf.data worker threads per host; 0 = all cores (bench.input sets 1 per core)
  c.data.download = True  # let TFDS download and prepare datasets that are not on disk

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / lr_base_batch
  c.optim.lr_base_batch = 256
  # linear (above) | sqrt: lr = base_lr * sqrt(batch_size / lr_base_batch) (BEiT v2 / DTM code)
  c.optim.lr_scaling = 'linear'
  c.optim.warmup_init_lr = 0.0  # lr at step 0, warmed up linearly to the peak (BEiT: 1e-6)
  c.optim.min_lr = 0.0
  c.optim.schedule = 'cosine'  # after warmup: cosine (to min_lr) | multistep (SimMIM's official)
  c.optim.milestones = ()  # multistep: steps from which the lr is multiplied by gamma once more
  c.optim.gamma = 0.1  # multistep: the factor per milestone
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 0.0  # global-norm clip; 0 turns it off
  c.optim.accum_steps = 1  # micro-batches accumulated into one update
  # Layer-wise lr decay (fine-tuning): encoder layer l of L gets lr * decay ** (L + 1 - l); 1 = off.
  c.optim.layer_decay = 1.0
  # Update all parameters over a few flat buffers (one per dtype, weight-decay and layer-decay
  # group) instead of leaf by leaf: same result and checkpoint layout, ~45% fewer XLA:CPU kernels,
  # but slower on XLA:CPU (its concatenations cost more than the per-leaf kernels; BENCHMARKS.md),
  # so off. Used only with mesh.fsdp = 1 (fsdp-sharded leaves keep the per-leaf update).
  c.optim.flat_update = False

  c.mae = ml_collections.ConfigDict()
  c.mae.mask_ratio = 0.75
  c.mae.norm_pix_loss = True
  c.mae.decoder_width = 512
  c.mae.decoder_depth = 8
  c.mae.decoder_heads = 16
  c.mae.decoder_mlp_ratio = 4
  c.mae.target = 'pixels'  # pixels | teacher (decoder predicts the config.distill teacher's tokens)

  # Feature distillation (framework 'distill'; also the teacher of mae.target='teacher').
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = 'ema'  # ema (of the student) | checkpoint (a mimjax workdir) | clip
  c.distill.clip_path = ml_collections.FieldReference(None, field_type=str)  # local CLIP weights
  c.distill.clip_quick_gelu = True  # QuickGELU: OpenAI weights; False for open_clip GELU models
  c.distill.teacher_workdir = ml_collections.FieldReference(None, field_type=str)  # checkpoint
  c.distill.teacher_layer = -1  # ema/checkpoint: -1 = after the final norm; k = block k output
  c.distill.teacher_dtype = 'auto'  # the teacher's compute dtype, as model.dtype
  c.distill.teacher_own_norm = True  # re-normalise inputs with the teacher's mean/std (CLIP's)
  c.distill.ema_momentum = 0.999  # ema teacher: t <- m * t + (1 - m) * student
  c.distill.mask_ratio = 0.4  # BEiT block-wise masking: round(ratio * N) patches masked
  c.distill.mask_count = 0  # > 0: exactly this many masked patches (reference: 75); 0: mask_ratio
  c.distill.mask_min_block = 16  # minimum patches per masked block
  c.distill.loss = 'cosine'  # per-token distance: cosine | smooth_l1 (beta 2) | l1 | l2
  c.distill.loss_tokens = 'all'  # all | masked: tokens the loss averages over
  c.distill.norm_target = False  # standardise each target token (after morphing under DTM)

  # Dynamic Token Morphing (Kim et al.): replaces the token-wise loss of distill / mae+teacher.
  c.dtm = ml_collections.ConfigDict()
  c.dtm.enabled = False
  c.dtm.weight = 1.0  # weight of the DTM loss
  c.dtm.num_schedules = 2  # L: morphing schedules per step, losses averaged
  c.dtm.max_rounds = 14  # K: rounds k ~ U{1..K}
  # N-bar: merges drawn from U{0..N - min_tokens}; 0 = the reference code's n1 = N (196)
  c.dtm.min_tokens = 1
  c.dtm.scheduler = 'paper'  # paper (eq. 1: floor(n/k), remainder last) | reference (ceil(n/k))
  # G > 0: the batch splits into G equal groups, each with its own num_schedules draws (the
  # reference draws per GPU: 8 GPUs x 2 = 16 per step); 0 = one draw for the whole batch
  c.dtm.schedule_groups = 0
  c.dtm.protect_first = True  # the first token never merges away (reference code)

  # LUT (Kim et al.): pooled visible tokens of two disjointly masked views are pulled toward an EMA
  # context encoder's pooled tokens of the other, unmasked view. Needs framework='mae',
  # data.augment='lut_two_view' and mae.mask_ratio >= 0.5.
  c.lut = ml_collections.ConfigDict()
  c.lut.enabled = False
  c.lut.alpha = 0.25  # weight of the broader-context loss (paper: 0.25 for ViT-B, 1.0 for ViT-S)
  c.lut.momentum = 0.996  # context-encoder EMA momentum at step 0; cosine schedule up to 1
  c.lut.head_dim = 4096  # hidden width of the projector and predictor MLPs

  # Weights a fresh run starts from (ignored when resuming from the workdir's own checkpoint).
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ''  # '' = random init; else a .safetensors / .pth file, or a mimjax workdir
  # timm: a timm ViT state dict | mae: an official MAE checkpoint | mimjax: params['encoder'] of
  # a mimjax.train workdir's checkpoint (fine-tuning a pre-trained run)
  c.init.format = 'timm'
  c.init.step = -1  # format mimjax: the checkpoint step to start from; -1 = latest

  c.supervised = ml_collections.ConfigDict()
  c.supervised.label_smoothing = 0.1
  c.supervised.mixup_alpha = 0.8  # Beta(a, a) mixing weight of mixup; 0 = no mixup
  c.supervised.cutmix_alpha = 1.0  # Beta(a, a) area weight of cutmix; 0 = no cutmix
  c.supervised.mix_prob = 1.0  # probability that a batch is mixed at all
  c.supervised.switch_prob = 0.5  # probability of cutmix rather than mixup when both are on

  c.tokenprop = ml_collections.ConfigDict()
  c.tokenprop.enabled = False  # reconstruct the image from the tokenizer output (Qian et al.)
  c.tokenprop.weight = 1e-3  # lambda of the reconstruction term
  c.tokenprop.hidden = 256  # channels of the decoder's two residual blocks
  c.tokenprop.output_size = 64  # side of the reconstruction (Table 16); the token grid is resized
  # to output_size / 4 first, and the target image to output_size

  c.simmim = ml_collections.ConfigDict()
  c.simmim.mask_ratio = 0.6  # masked cells: ceil(cells * ratio), replaced by the mask token
  c.simmim.mask_patch_size = 32  # side of a mask cell in pixels; a multiple of the model's patch

  # MTO (Choi et al.): entropy losses on masked-vs-visible token affinities (mimjax/plugins/mto.py).
  c.mto = ml_collections.ConfigDict()
  c.mto.enabled = False
  c.mto.where = 'encoder'  # encoder (SimMIM: mask tokens in the encoder) | decoder (MAE's decoder)
  c.mto.tau = 1.0  # affinity temperature; 1 = eq. 2 (none); 0 means sqrt(feature dim)
  c.mto.layer_norm = False  # layer-normalise (no params) the features first; False = eq. 2 (raw)
  c.mto.spa_self = False  # L_spa counts each token's affinity to itself (inert: mto.py docstring)
  c.mto.ranking = 'decrease'  # decrease (the text's intent) | printed (eq. 5 as printed)
  c.mto.lambda_spa = 1.0  # weight of L_spa (eq. 3): visible tokens ignore masked ones at layer 0
  c.mto.lambda_e = 1.0  # weight of L_e (eq. 4): 1 / (H^0 + eps), maximises layer-0 heterogeneity
  c.mto.lambda_r = 1.0  # weight of L_r (eq. 5): heterogeneity ranked to fall with depth
  c.mto.eps = 1e-6  # epsilon of L_e

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 takes every device not used by the other axes
  c.mesh.fsdp = 1
  # (regex over 'a/b/c' parameter paths, 'fsdp' | 'replicate'); first match wins, default replicate.
  c.mesh.param_rules = (('.*', 'fsdp'),)
  c.mesh.fsdp_min_size = 2 ** 14  # arrays smaller than this stay replicated

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  # 0: single process; -1: auto-detect (TPU pod, SLURM); N: explicit.
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # Resuming a workdir with a config that changes the training trajectory (batch, lr, schedule,
  # seed, data, model, losses) is refused; list here (comma-separated dotted keys, e.g.
  # 'total_steps,optim.base_lr') the changes you make deliberately.
  c.resume = ml_collections.ConfigDict()
  c.resume.accept_changes = ''

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 50
  c.log.images_every_steps = 5000  # reconstruction PNGs; 0 turns them off
  c.log.progress_bar = True
  # TensorBoard events under WORKDIR/tensorboard, written by TensorFlow's own file layer (it reaches
  # gs:// itself but cannot be pointed at a GCS emulator); metrics.jsonl has every value anyway.
  c.log.tensorboard = True
  # Weights & Biases tracking (`pip install '.[wandb]'`; WANDB_MODE=offline keeps it on disk): the
  # logged scalars and pictures, the config, one W&B run per workdir (resuming continues it).
  c.log.wandb = False
  c.log.wandb_project = 'mimjax'

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  # Held-out evaluation while training, every this many steps (0 = off): top-1 / top-5 for
  # supervised runs, the kNN monitor below for self-supervised ones (mae, simmim, distill).
  c.eval.every_steps = 0
  # kNN monitor: the first bank_examples of data.train_split (centre crops) are the memory, the
  # first query_examples of data.eval_split the queries, k neighbours vote (cosine similarity of
  # eval.feature, weights exp(sim / eval.knn_temperature)). TFDS stores splits shuffled and an
  # image folder's files are in a fixed shuffled order, so the first N are a sample of every class.
  # Sizes larger than the splits are lowered to fit them, with a note.
  c.eval.knn_monitor = ml_collections.ConfigDict()
  c.eval.knn_monitor.bank_examples = 10_000
  c.eval.knn_monitor.query_examples = 5_000
  c.eval.knn_monitor.k = 20
  c.eval.knn_k = (20, 200)  # kNN protocol (DINO / MAE): neighbour counts, cosine similarity
  c.eval.knn_temperature = 0.07  # kNN votes weighted by exp(similarity / T)
  # frozen-feature protocols: pooled (the encoder's pool) | cls | gap (mean patch token after the
  # final norm) | mae_gap (MAE's global pool: a fresh norm of the mean pre-norm patch token)
  c.eval.feature = 'pooled'
  # Linear probes (linear: MAE's protocol; linear_cached: on centre-crop features extracted once):
  # BatchNorm without affine + linear layer on the frozen encoder.
  c.eval.linear = ml_collections.ConfigDict()
  c.eval.linear.train_split = 'train[:99%]'  # the probe's training images
  # Held-out training images that choose the lr of the sweep (never the eval split).
  c.eval.linear.holdout_split = 'train[99%:]'
  c.eval.linear.crop_scale = (0.08, 1.0)  # linear: RandomResizedCrop area range (torchvision's)
  c.eval.linear.optimizer = 'lars'  # lars (MAE's) | sgd, both with momentum
  c.eval.linear.trust_coefficient = 0.001  # MAE's LARS
  c.eval.linear.base_lrs = (0.1,)  # peak lr = base_lr * batch_size / 256; several = a sweep
  c.eval.linear.batch_size = 16384
  c.eval.linear.epochs = 90
  c.eval.linear.warmup_epochs = 10
  c.eval.linear.momentum = 0.9
  c.eval.linear.weight_decay = 0.0
  # Analyses (attention distance, spectrum, heterogeneity, pictures): images of the eval split.
  c.eval.analysis_examples = 1000
  return c


def apply_runlocal(c):
  """Shrinks `c` in place to the offline default: Fashion-MNIST, a small ViT, minutes on a CPU."""
  c.data.name = 'fashion_mnist'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.image_size = 28
  c.data.mean = (0.286, 0.286, 0.286)
  c.data.std = (0.353, 0.353, 0.353)
  c.data.crop_scale = (0.35, 1.0)
  c.data.shuffle_buffer = 60_000
  c.data.eval_crop_fraction = 1.0
  c.data.cache = True
  c.model.variant = 'pico/4'
  c.model.dtype = 'float32'
  c.batch_size = 128
  c.total_steps = 1500
  c.warmup_steps = 100
  c.checkpoint.every_steps = 500
  c.log.every_steps = 25
  c.log.images_every_steps = 500
  c.eval.knn_monitor.bank_examples = 2_000  # small: the monitor is a progress signal
  c.eval.knn_monitor.query_examples = 1_000
  c.eval.linear.optimizer = 'sgd'  # LARS's trust ratio moves too little in a few hundred steps
  c.eval.linear.train_split = 'train[:10000]'  # a small probe budget: minutes on a CPU
  c.eval.linear.holdout_split = 'train[58000:]'
  c.eval.linear.crop_scale = (0.35, 1.0)  # as pre-training: 28-pixel images lose too much below
  c.eval.linear.batch_size = 256
  c.eval.linear.epochs = 10
  c.eval.linear.warmup_epochs = 1
  c.eval.linear.base_lrs = (0.1, 0.4, 1.6)
  return c
