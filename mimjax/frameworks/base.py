"""The contract between the trainer, frameworks (MAE, SimMIM, ...) and plug-ins (DTM, LUT, ...).

A *framework* owns the trainable Flax module (always with the ViT under `params['encoder']`) and the
base objective; its forward returns `ForwardOutputs`, and its class states which capabilities
(`CAPABILITIES`) it provides under a config. A *plug-in* adds a loss term computed from those
outputs; its class states the capabilities it requires, and `mimjax.validation` refuses a plug-in on
a framework that lacks one, before anything is written. A plug-in may own parameters
(`params[plugin.name]`) and non-trained state (`model_state[plugin.name]`, e.g. an EMA encoder).
A framework may hold a *teacher* (`Framework.build_teacher`, a `mimjax.teachers.Teacher`): a
component whose weights live in `model_state['teacher']` and that the base class initialises,
loads, moves after each update and counts in the step's FLOPs.
Everything here is a pure function of arrays so the whole objective runs inside one `jax.jit`.
"""
import abc
import dataclasses
import functools
import types
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

from mimjax.models import flops
from mimjax.models import vit

Metrics = Dict[str, jax.Array]

# What a framework's forward can provide (key -> what it is); a plug-in requires a subset.
CAPABILITIES = {
    'mask': 'a per-patch mask of the images (ForwardOutputs.mask)',
    'patch_order': "MAE's random patch order, from which further disjoint views are drawn",
    'teacher_features':
        'student predictions and teacher targets per token (ForwardOutputs.features)',
    'tokenizer': "the patch tokenizer's output for all N patches (encoder['tokenizer'])",
    'second_view': 'a second augmented view of every image (batch["image2"], from the data)',
    'encoder_mask_tokens': 'a learned mask token standing in for masked patches in the encoder',
    'decoder_mask_tokens': 'a learned mask token standing in for masked patches in the decoder',
    'encoder_layers': "the encoder's per-layer tokens (encoder['layers'])",
    'encoder_attention': "the encoder's per-layer attention maps (encoder['attention'])",
    'decoder_layers': "the decoder's per-layer tokens (decoder['layers'])",
}
# Capabilities that are intermediates recorded only when someone asks for them.
CAPTURES = ('encoder_layers', 'encoder_attention', 'decoder_layers')


@flax.struct.dataclass
class FeatureTargets:
  """Token-wise feature prediction and its teacher target, for distillation losses."""
  pred: jax.Array  # [B, N, D_teacher], float32
  target: jax.Array  # [B, N, D_teacher], float32, no gradient
  mask: Optional[jax.Array]  # bool [B, N]: the tokens the loss averages over; None = all


@flax.struct.dataclass
class ForwardOutputs:
  """What a framework's forward gives plug-ins and pictures; None where it has no such thing."""
  encoder: Dict[str, Any]  # the ViT's outputs: tokens, patch_tokens, pooled, tokenizer, captures
  image: jax.Array  # the images the encoder saw (after any mixing), [B, H, W, C]
  mask: Optional[jax.Array] = None  # bool [B, N]: True where a patch was masked
  patch_order: Optional[jax.Array] = None  # int [B, N]: MAE's random patch order
  keep_idx: Optional[jax.Array] = None  # int [B, n_keep]: the patches the encoder saw
  decoder: Optional[Dict[str, Any]] = None  # MAE decoder outputs: pred, layers when captured
  reconstruction: Optional[jax.Array] = None  # per-patch pixel prediction [B, N, p*p*C]
  features: Optional[FeatureTargets] = None  # teacher targets (distill, MAE with a teacher)


def _replace_leaves(tree, replacement):
  """`tree` with every leaf that the nested dict `replacement` holds taken from it."""
  if replacement is None:
    return tree
  if not isinstance(replacement, dict):
    return replacement
  return {k: _replace_leaves(v, replacement.get(k)) for k, v in tree.items()}


@dataclasses.dataclass(frozen=True)
class Host:
  """What a plug-in knows of the framework it is added to (`Framework.host`): the encoder's shape
  and how many patches it sees, not the framework itself, so a plug-in depends on this contract
  alone and works on any framework that provides the capabilities it requires."""
  name: str  # the framework's, for messages
  width: int  # the encoder's token width
  grid_size: int  # patches per side
  num_patches: int
  num_kept: int  # patches the encoder sees per image: all of them unless the framework drops some
  channels: int  # image channels
  encoder_kwargs: Mapping[str, Any]  # the ViT's constructor arguments (read-only)

  def encoder_flops(self, tokens=None):
    """Forward FLOPs per example of the encoder on `tokens` patches (default: all of them)."""
    return flops.encoder(self.encoder_kwargs, self.channels,
                         self.num_patches if tokens is None else tokens)


class Plugin(abc.ABC):
  """A loss term added to a framework's objective, built from the config and the framework's
  `Host` description."""
  name: str = ''
  # True when the plug-in's term replaces the framework's base loss (e.g. DTM's morphed version of
  # the token-wise distillation loss); the base loss is then reported as a metric only.
  replaces_base_loss: bool = False

  def __init__(self, config, host: Host):
    self.config = config
    self.host = host
    self.captures = frozenset(self.requires(config)) & frozenset(CAPTURES)

  @classmethod
  @abc.abstractmethod
  def enabled(cls, config) -> bool:
    """Whether `config` turns this plug-in on."""

  @classmethod
  @abc.abstractmethod
  def requires(cls, config) -> Mapping[str, str]:
    """The CAPABILITIES this plug-in reads under `config`, each with the fix to offer when the
    framework (or the data) does not provide it."""

  @classmethod
  def config_fields(cls):
    """The plug-in's own config section, `config.<name>` (a ConfigDict of its fields and their
    defaults, with `enabled`), or None for a plug-in without fields. `config_lib.base_config`
    adds it to the schema."""
    return None

  @classmethod
  def check_config(cls, config):
    """Raises errors.ConfigError on values of the plug-in's own config fields that cannot work."""
    del config

  def init_params(self, rng, outputs: ForwardOutputs) -> Any:
    """Parameters of the plug-in's own modules (None when it has none)."""
    del rng, outputs
    return None

  def init_state(self, params) -> Any:
    """Non-trained state (EMA weights, running statistics), given all initial params."""
    del params
    return None

  @abc.abstractmethod
  def loss(self, params, state, outputs: ForwardOutputs, batch, rng, step,
           train) -> Tuple[jax.Array, Metrics, Any]:
    """Returns (weighted loss term, metrics, new state)."""

  def update_state(self, params, state, step) -> Any:
    """Called after each optimizer update (e.g. to move an EMA); returns the new state."""
    del params, step
    return state

  def flop_terms(self) -> Dict[str, float]:
    """Analytic FLOPs per example of the ViT passes this plug-in adds to a train step (trained
    passes x flops.TRAIN_FACTOR); none for small heads and losses."""
    return {}


class Framework(abc.ABC):
  """A family of objectives around one trainable module; see the module docstring."""
  name: str = ''
  # The `eval_metrics` key whose maximum marks the best evaluation; empty without eval_metrics.
  best_metric: str = ''
  # Parameter names (last path element) that never get weight decay besides 1-D ones and biases:
  # the reference's `no_weight_decay()` list in mimjax names, as timm's models declare it.
  no_weight_decay: tuple = ()

  @classmethod
  def provides(cls, config) -> frozenset:
    """The CAPABILITIES this framework's forward provides under `config`. Every framework is built
    on the mimjax ViT, whose tokenizer output and per-layer captures are always available."""
    del config
    return frozenset({'tokenizer', 'encoder_layers', 'encoder_attention'})

  @classmethod
  def mask_token_sites(cls, config):
    """Where a learned mask token stands in for masked patches: a subset of (encoder, decoder)."""
    return tuple(site for site in ('encoder', 'decoder')
                 if f'{site}_mask_tokens' in cls.provides(config))

  @classmethod
  def config_fields(cls):
    """The framework's own config section, `config.<name>` (a ConfigDict of its fields and their
    defaults), or None for a framework without fields. `config_lib.base_config` adds it to the
    schema."""
    return None

  @classmethod
  def check_config(cls, config):
    """Raises errors.ConfigError on settings this framework cannot work with."""
    del config

  @classmethod
  def config_sections(cls, config):
    """The config sections of frameworks this one reads under `config`: its own (named as the
    framework), and e.g. `distill` for a teacher; --print_config hides the others."""
    del config
    return {cls.name}

  @classmethod
  def finetune_recipe(cls, config):
    """The `finetune_recipes.RECIPES` key a run of this framework under `config` is fine-tuned
    with: MAE's `main_finetune.py` unless the framework's paper, or that of a plug-in the run
    used, gives its own."""
    del config
    return 'mae'

  def __init__(self, config, plugins=(), captures=()):
    """`captures`: intermediates (CAPTURES) to record besides the plug-ins' (for analyses)."""
    self.config = config
    self.extra_captures = frozenset(captures)
    self.image_size = config.data.image_size
    self.encoder_kwargs = vit.encoder_kwargs(config.model, self.image_size)
    self.patch_size = self.encoder_kwargs['patch_size']
    self.grid_size = self.image_size // self.patch_size  # the ViT's patches per side
    self.num_patches = self.grid_size ** 2
    self.host = Host(name=self.name, width=self.encoder_kwargs['width'], grid_size=self.grid_size,
                     num_patches=self.num_patches, num_kept=self.num_kept,
                     channels=config.data.channels,
                     encoder_kwargs=types.MappingProxyType(dict(self.encoder_kwargs)))
    self.plugins = [p(config, self.host) for p in plugins]
    # The framework's one teacher component (None without one), before the model, whose head may
    # be sized by the teacher's width.
    self.teacher = self.build_teacher()
    self.model = self.build_model()

  @property
  def captures(self):
    return {c for p in self.plugins for c in p.captures} | self.extra_captures

  @property
  def num_kept(self):
    """Patches the encoder sees per image: all of them, unless the framework drops some (MAE)."""
    return self.num_patches

  def build_teacher(self):
    """The teacher this framework distils from under its config (`mimjax.teachers.build`), or None.
    Its weights are `model_state['teacher']`; its `targets` are the framework's to use."""
    return None

  @abc.abstractmethod
  def build_model(self):
    """The trainable Flax module."""

  def model_params(self, params):
    """The params of `self.model`: everything but the plug-ins' own entries."""
    plugin_names = {p.name for p in self.plugins}
    return {k: v for k, v in params.items() if k not in plugin_names}

  @abc.abstractmethod
  def init_model(self, rng, batch) -> Dict[str, Any]:
    """Initial params of `self.model` for a batch of this shape."""

  @abc.abstractmethod
  def forward(self, params, model_state, batch, rng,
              train) -> Tuple[jax.Array, Metrics, ForwardOutputs]:
    """Base objective: (loss, metrics, outputs for plug-ins and visualisation)."""

  def init_state(self, params) -> Dict[str, Any]:
    """The framework's own non-trained state, given its initial params: its teacher's weights
    (placeholders for a frozen teacher, until `load_frozen`)."""
    return {} if self.teacher is None else {'teacher': self.teacher.init_state(params)}

  def load_frozen(self, model_state):
    """Replaces placeholders in a freshly initialised `model_state` with weights read from disk
    (host numpy arrays: a pre-trained teacher). Runs outside jit, not on resume."""
    if self.teacher is None:
      return model_state
    return dict(model_state, teacher=self.teacher.load_frozen(model_state['teacher']))

  def init(self, rng, batch, pretrained=None):
    """All params and non-trained state: the framework's, then each plug-in's.

    `pretrained` (a nested dict, e.g. {'encoder': ...}) replaces the leaves it holds before the
    plug-ins initialise, so EMA copies and teachers start from the same weights. One compiled
    program: run op by op, a ViT's initialisers dispatch (and compile) hundreds of small ops.
    """
    return self._jitted_init(rng, batch, pretrained)

  @functools.cached_property
  def _jitted_init(self):
    return jax.jit(self._init)

  def _init(self, rng, batch, pretrained):
    """`init`'s body, traced once per batch shape."""
    model_rng, plugin_rng, fwd_rng = jax.random.split(rng, 3)
    params = _replace_leaves(dict(self.init_model(model_rng, batch)), pretrained)
    model_state = dict(self.init_state(params))
    if self.plugins:
      _, _, outputs = self.forward(params, model_state, batch, fwd_rng, train=False)
      for i, plugin in enumerate(self.plugins):
        p = plugin.init_params(jax.random.fold_in(plugin_rng, i), outputs)
        if p is not None:
          params[plugin.name] = p
      for plugin in self.plugins:
        s = plugin.init_state(params)
        if s is not None:
          model_state[plugin.name] = s
    return params, model_state

  def loss(self, params, model_state, batch, rng, step, train=True):
    """Total objective = base loss + every plug-in's term. Returns (loss, (metrics, state))."""
    fwd_rng, plugin_rng = jax.random.split(rng)
    loss, metrics, outputs = self.forward(params, model_state, batch, fwd_rng, train)
    metrics = {f'loss_{self.name}': loss, **metrics}
    if any(p.replaces_base_loss for p in self.plugins):
      loss = jnp.zeros_like(jax.lax.stop_gradient(loss))
    new_state = dict(model_state)
    for i, plugin in enumerate(self.plugins):
      term, plugin_metrics, state = plugin.loss(
          params, model_state.get(plugin.name), outputs, batch, jax.random.fold_in(plugin_rng, i),
          step, train)
      loss = loss + term
      metrics.update(plugin_metrics)
      if state is not None:
        new_state[plugin.name] = state
    metrics['loss'] = loss
    return loss, (metrics, new_state)

  def update_state(self, params, model_state, step):
    """Lets plug-ins and the teacher (an EMA) move their non-trained state after the optimizer
    update."""
    new_state = dict(model_state)
    for plugin in self.plugins:
      if plugin.name in model_state:
        new_state[plugin.name] = plugin.update_state(params, model_state[plugin.name], step)
    if self.teacher is not None:
      new_state['teacher'] = self.teacher.update(model_state['teacher'], params)
    return new_state

  def encoder_flops(self, tokens=None):
    """Forward FLOPs per example of the encoder on `tokens` patches (default: all of them)."""
    return self.host.encoder_flops(tokens)

  def flop_terms(self) -> Dict[str, float]:
    """Analytic FLOPs per example of the framework's own ViT passes of one train step (trained
    passes x flops.TRAIN_FACTOR, frozen ones x 1). Default: the encoder on every patch."""
    return {'encoder': flops.TRAIN_FACTOR * self.encoder_flops()}

  def step_flops(self) -> Dict[str, float]:
    """Named analytic FLOP terms per example of one train step: the framework's, its teacher's
    and each plug-in's (matrix products only, see `mimjax.models.flops`)."""
    terms = dict(self.flop_terms())
    if self.teacher is not None:
      terms.update(self.teacher.flop_terms(self.config.data.channels))
    for plugin in self.plugins:
      terms.update(plugin.flop_terms())
    return terms

  def eval_metrics(self, params, model_state, batch):
    """Held-out evaluation of one padded batch (with bool `valid` [B]): a dict of float sums over
    the valid examples, including 'count'; the trainer reports sum / count. None: no evaluation."""
    del params, model_state, batch
    return None

  def visualize(self, outputs: ForwardOutputs, batch) -> Dict[str, jnp.ndarray]:
    """Named uint8 image grids [H, W, 3] worth looking at (default: none)."""
    del outputs, batch
    return {}
