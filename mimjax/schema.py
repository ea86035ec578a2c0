"""The config schema's core: the fields every run has, one function per section.

A framework's or plug-in's own section (`mae`, `distill`, `dtm`, ...) is declared on its class
(`config_fields`), next to the code that reads it, so a new one is one module plus one registry
line; `config_lib.base_config` assembles these core sections and every registered one into the
full config. The sections here belong to no one component: the ViT (`model`), the data, the
optimizer, the start weights (`init`), the mesh, multi-host start-up, checkpoints, resuming,
logging and evaluation are read by the trainer and by modules in several layers (`model` by the
frameworks, teachers, evaluation and export), and modules below the registry read a saved run's
`model` and `data` on their defaults (`workdir.read_encoder_config`), so they stay in this leaf
module.

Recipes (`configs/*.py`) start from `base_config()` and change values; they never add keys.
Because a recipe returns the ConfigDict locked, a misspelt `--config.x.y=v` fails at start-up
naming the key. A workdir's config.json is read back on top of these defaults (`merged`), so the
schema lives in the package, not with the recipes.
"""
import ml_collections

from mimjax import errors


def model_fields():
  """The ViT encoder: size, patches, position embedding, init, head, dtype, MoTo tokenizer."""
  s = ml_collections.ConfigDict()
  s.variant = 'B/16'  # '<size>/<patch>', size in mimjax.models.vit.VARIANTS
  s.posemb = 'sincos2d'  # learn | sincos2d | none (e.g. with relative position bias only)
  # BEiT relative position bias: none | block (one table per block) | shared (one for all blocks)
  # | both (the DTM / BEiT v2 reference pre-training: each block adds its own and the shared one)
  s.rel_pos = 'none'
  # default (MAE: Xavier) | beit (BEiT: truncated normal 0.02, output projections of block l
  # divided by sqrt(2 l), zero biases, no key bias; SimMIM's ViT too) | timm (DeiT: trunc-normal
  # 0.02 on every Linear, zero biases)
  s.weight_init = 'default'
  s.cls_token = True
  s.pool = 'tok'  # tok | gap
  # True: no final norm on the tokens, a fresh LayerNorm of the pooled feature instead (MAE's
  # fine-tuning with global_pool, timm's fc_norm=True)
  s.fc_norm = False
  s.layerscale = 0.0  # initial value of layer scale; 0 turns it off
  s.drop_path = 0.0
  # Compute dtype: auto | float32 | bfloat16 | float16. auto = bfloat16 on TPU and GPUs of compute
  # capability >= 8.0, float16 on older GPUs (T4, V100: no bfloat16), float32 on CPU. float16 trains
  # with dynamic loss scaling (docs/gpu.md); params, softmax, norms, losses and optimizer state stay
  # float32 whatever the compute dtype.
  s.dtype = 'auto'
  s.remat = False  # rematerialise each block in the backward pass
  s.num_classes = 0  # classification head size; 0 = no head
  # head kernel init: 0 = zeros, else timm's trunc_normal_(std) (MAE's fine-tuning: 2e-5)
  s.head_init_std = 0.0
  s.tokenizer_norm = 'none'  # none (plain patch embedding) | moto (MoTo, Qian et al.)
  s.moto = ml_collections.ConfigDict()
  s.moto.entities = 8  # n, the number of soft semantic entities
  s.moto.stem_channels = 16  # c of the 3x3 conv stem before MoTo; 0 = MoTo on the image
  s.moto.stem_stride = 1  # s of that stem: MoTo at 1/s of the image side
  s.moto.key_dim = 16  # output channels of the 1x1 convs k and q
  s.moto.temperature = 0.1  # tau in L = softmax(tau * Z), multiplied as the paper writes it
  s.moto.eps = 1e-5  # added to the weighted standard deviation
  return s


def data_fields():
  """The input pipeline: dataset, splits, image size, normalisation, augmentation."""
  s = ml_collections.ConfigDict()
  s.name = 'imagenet2012'  # a TFDS name, or a path to an image folder (see README)
  s.data_dir = ml_collections.FieldReference(None, field_type=str)
  s.train_split = 'train'
  s.eval_split = 'validation'
  s.image_size = 224
  s.channels = 3  # grayscale images are replicated to 3 channels
  s.mean = (0.485, 0.456, 0.406)
  s.std = (0.229, 0.224, 0.225)
  # rrc_flip | simmim (its crop bilinear) | deit | center | lut_two_view (image + image2, LUT)
  # | beit (colour jitter, flip, crop)
  s.augment = 'rrc_flip'
  s.crop_scale = (0.2, 1.0)
  # 'deit' augmentation: RandAugment (timm's rand-m9-mstd0.5-inc1 by default) and random erasing.
  s.randaug_layers = 2  # ops applied per image (each with probability 0.5); 0 = off
  s.randaug_magnitude = 9  # on timm's 0..10 scale
  s.randaug_magnitude_std = 0.5  # Gaussian noise on the magnitude per op
  s.random_erase = 0.25  # probability of erasing one random box with per-pixel noise
  # Repeated augmentation (DeiT, Hoffer et al.): each training image this many times in a row,
  # each copy augmented differently; 1 = off.
  s.repeated_aug = 1
  s.eval_crop_fraction = 0.875  # evaluation: resize to size / fraction, then centre crop
  s.cache = False  # keep the raw (encoded) split in memory; for small datasets
  # Labelled subset (low-label fine-tuning): > 0 trains on a class-stratified subset of
  # data.train_split, the same number of images of every class (this fraction of the split, split
  # evenly; so 1.0 works only on balanced data), drawn from config.seed; the subset for a smaller
  # fraction is part of a larger one's. The split's records are read once into memory: it is for
  # small datasets, and a TFDS split over 2 GiB is refused. 0 = every image.
  s.label_fraction = 0.0
  s.shuffle_buffer = 50_000
  # Image folder without train/ and val/ subfolders: in each class, max(this fraction of its
  # images, folder_holdout_min) are the eval split (those of lowest path hash, so adding images
  # moves few), the rest train; a class always keeps one image to train on.
  s.folder_holdout = 0.1
  s.folder_holdout_min = 10
  # Image folder: data.mean / data.std measured from (up to 1000 of) its training images at start,
  # replacing the recipe's values; False keeps data.mean / data.std as set.
  s.folder_stats = True
  s.threads = 0  # tf.data worker threads per host; 0 = all cores (bench.input sets 1 per core)
  s.download = True  # let TFDS download and prepare datasets that are not on disk
  return s


def optim_fields():
  """AdamW and its lr schedule (warmup, cosine or multistep), clipping, accumulation."""
  s = ml_collections.ConfigDict()
  s.base_lr = 1.5e-4  # lr = base_lr * batch_size / lr_base_batch
  s.lr_base_batch = 256
  # linear (above) | sqrt: lr = base_lr * sqrt(batch_size / lr_base_batch) (BEiT v2 / DTM code)
  s.lr_scaling = 'linear'
  s.warmup_init_lr = 0.0  # lr at step 0, warmed up linearly to the peak (BEiT: 1e-6)
  s.min_lr = 0.0
  s.schedule = 'cosine'  # after warmup: cosine (to min_lr) | multistep (SimMIM's official)
  s.milestones = ()  # multistep: steps from which the lr is multiplied by gamma once more
  s.gamma = 0.1  # multistep: the factor per milestone
  s.b1 = 0.9
  s.b2 = 0.95
  s.weight_decay = 0.05
  s.grad_clip = 0.0  # global-norm clip; 0 turns it off
  s.accum_steps = 1  # micro-batches accumulated into one update
  # Layer-wise lr decay (fine-tuning): encoder layer l of L gets lr * decay ** (L + 1 - l); 1 = off.
  s.layer_decay = 1.0
  # Update all parameters over a few flat buffers (one per dtype, weight-decay and layer-decay
  # group) instead of leaf by leaf: same result and checkpoint layout, ~45% fewer XLA:CPU kernels,
  # but slower on XLA:CPU (its concatenations cost more than the per-leaf kernels; BENCHMARKS.md),
  # so off. Used only with mesh.fsdp = 1 (fsdp-sharded leaves keep the per-leaf update).
  s.flat_update = False
  return s


def init_fields():
  """Weights a fresh run starts from (ignored when resuming from the workdir's own checkpoint)."""
  s = ml_collections.ConfigDict()
  s.checkpoint = ''  # '' = random init; else a .safetensors / .pth file, or a mimjax workdir
  # timm: a timm ViT state dict | mae: an official MAE checkpoint | mimjax: params['encoder'] of
  # a mimjax.train workdir's checkpoint (fine-tuning a pre-trained run)
  s.format = 'timm'
  s.step = -1  # format mimjax: the checkpoint step to start from; -1 = latest
  return s


def mesh_fields():
  """The device mesh (data x fsdp axes) and which parameters are sharded."""
  s = ml_collections.ConfigDict()
  s.data = -1  # -1 takes every device not used by the other axes
  s.fsdp = 1
  # (regex over 'a/b/c' parameter paths, 'fsdp' | 'replicate'); first match wins, default replicate.
  s.param_rules = (('.*', 'fsdp'),)
  s.fsdp_min_size = 2 ** 14  # arrays smaller than this stay replicated
  return s


def distributed_fields():
  """Multi-host start-up (jax.distributed.initialize)."""
  s = ml_collections.ConfigDict()
  s.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  # 0: single process; -1: auto-detect (TPU pod, SLURM); N: explicit.
  s.num_processes = 0
  s.process_id = -1
  return s


def checkpoint_fields():
  """Orbax checkpoints in the workdir: how often, how many kept, async."""
  s = ml_collections.ConfigDict()
  s.every_steps = 1000
  s.keep = 3
  s.async_save = True
  return s


def resume_fields():
  """Resuming a workdir with a config that changes the training trajectory (batch, lr, schedule,
  seed, data, model, losses) is refused; list here (comma-separated dotted keys, e.g.
  'total_steps,optim.base_lr') the changes you make deliberately."""
  s = ml_collections.ConfigDict()
  s.accept_changes = ''
  return s


def log_fields():
  """metrics.jsonl, TensorBoard, Weights & Biases, pictures, the progress bar."""
  s = ml_collections.ConfigDict()
  s.every_steps = 50
  s.images_every_steps = 5000  # reconstruction PNGs; 0 turns them off
  s.progress_bar = True
  # TensorBoard events under WORKDIR/tensorboard, written by TensorFlow's own file layer (it reaches
  # gs:// itself but cannot be pointed at a GCS emulator); metrics.jsonl has every value anyway.
  s.tensorboard = True
  # Weights & Biases tracking (`pip install '.[wandb]'`; WANDB_MODE=offline keeps it on disk): the
  # logged scalars and pictures, the config, one W&B run per workdir (resuming continues it).
  s.wandb = False
  s.wandb_project = 'mimjax'
  return s


def eval_fields():
  """Evaluation: the in-training evaluators and the offline protocols (kNN, linear probes)."""
  s = ml_collections.ConfigDict()
  s.batch_size = 256
  # Held-out evaluation while training, every this many steps (0 = off), by the evaluators that
  # in_loop names (mimjax/eval/evaluator.py: held_out, the framework's top-1 / top-5;
  # knn_monitor, below); () = the framework's own: held_out for supervised runs, knn_monitor for
  # self-supervised ones (mae, simmim, distill). Records: WORKDIR/eval_<framework>.json.
  s.every_steps = 0
  s.in_loop = ()
  # kNN monitor: the first bank_examples of data.train_split (centre crops) are the memory, the
  # first query_examples of data.eval_split the queries, k neighbours vote (cosine similarity of
  # eval.feature, weights exp(sim / eval.knn_temperature)). TFDS stores splits shuffled and an
  # image folder's files are in a fixed shuffled order, so the first N are a sample of every class.
  # Sizes larger than the splits are lowered to fit them, with a note.
  s.knn_monitor = ml_collections.ConfigDict()
  s.knn_monitor.bank_examples = 10_000
  s.knn_monitor.query_examples = 5_000
  s.knn_monitor.k = 20
  s.knn_k = (20, 200)  # kNN protocol (DINO / MAE): neighbour counts, cosine similarity
  s.knn_temperature = 0.07  # kNN votes weighted by exp(similarity / T)
  # frozen-feature protocols: pooled (the encoder's pool) | cls | gap (mean patch token after the
  # final norm) | mae_gap (MAE's global pool: a fresh norm of the mean pre-norm patch token)
  s.feature = 'pooled'
  # Linear probes (linear: MAE's protocol; linear_cached: on centre-crop features extracted once):
  # BatchNorm without affine + linear layer on the frozen encoder.
  s.linear = ml_collections.ConfigDict()
  s.linear.train_split = 'train[:99%]'  # the probe's training images
  # Held-out training images that choose the lr of the sweep (never the eval split).
  s.linear.holdout_split = 'train[99%:]'
  s.linear.crop_scale = (0.08, 1.0)  # linear: RandomResizedCrop area range (torchvision's)
  s.linear.optimizer = 'lars'  # lars (MAE's) | sgd, both with momentum
  s.linear.trust_coefficient = 0.001  # MAE's LARS
  s.linear.base_lrs = (0.1,)  # peak lr = base_lr * batch_size / 256; several = a sweep
  s.linear.batch_size = 16384
  s.linear.epochs = 90
  s.linear.warmup_epochs = 10
  s.linear.momentum = 0.9
  s.linear.weight_decay = 0.0
  # Analyses (attention distance, spectrum, heterogeneity, pictures): images of the eval split.
  s.analysis_examples = 1000
  return s


# Section name -> the function that builds it: the core sections, which every run has.
SECTIONS = {
    'model': model_fields,
    'data': data_fields,
    'optim': optim_fields,
    'init': init_fields,
    'mesh': mesh_fields,
    'distributed': distributed_fields,
    'checkpoint': checkpoint_fields,
    'resume': resume_fields,
    'log': log_fields,
    'eval': eval_fields,
}


def assemble(owned):
  """Every field mimjax reads, with its default: the top-level fields, the core SECTIONS and
  `owned` ((section name, ConfigDict) pairs: the frameworks' and plug-ins' own sections). A
  ConfigDict lists its keys sorted, so the order of the sections here does not show in
  --print_config."""
  c = ml_collections.ConfigDict()
  c.framework = 'mae'  # a registry.FRAMEWORKS name: mae | simmim | distill | supervised
  c.seed = 0
  c.batch_size = 4096
  c.total_steps = 100_000
  c.warmup_steps = 10_000
  for name, fields in SECTIONS.items():
    c[name] = fields()
  for name, section in owned:
    if name in c:  # two owners of one name would silently share (or lose) fields
      raise ValueError(f'Config section {name!r} is declared twice; rename a framework or plug-in.')
    c[name] = section
  return c


def merged(defaults, values):
  """`defaults` (a ConfigDict) with the saved `values` (a config.json dict) set on it, locked.

  Starting from the defaults means a workdir written by an older mimjax still loads; a key the
  defaults do not have is an error that names it.
  """
  def merge(target, src, prefix):
    for key, value in src.items():
      if key not in target:
        raise errors.ConfigError(f'config.json has unknown key {prefix}{key}; it was written by a '
                                 'different mimjax version.')
      if isinstance(target[key], ml_collections.ConfigDict):
        merge(target[key], value, f'{prefix}{key}.')
      else:
        target[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
            if isinstance(value, list) else value
  merge(defaults, values, '')
  defaults.lock()
  return defaults
