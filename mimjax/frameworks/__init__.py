"""Framework registry: config.framework -> Framework class; plug-ins chosen by config."""
from mimjax.frameworks import distill
from mimjax.frameworks import mae
from mimjax.frameworks import simmim
from mimjax.frameworks import supervised
from mimjax.methods import dtm
from mimjax.methods import lut
from mimjax.methods import mto
from mimjax.methods import tokenprop

FRAMEWORKS = {
    'mae': mae.MAE,
    'simmim': simmim.SimMIM,
    'distill': distill.Distill,
    'supervised': supervised.Supervised,
}

# Plug-in classes in the order their loss terms are added; each has `enabled(config)`.
PLUGINS = (lut.LUT, mto.MTO, tokenprop.TokenProp, dtm.DTM)


def enabled_plugins(config):
  return [p for p in PLUGINS if p.enabled(config)]


def check_plugins(config):
  """Rejects plug-ins on a framework they cannot work with (each plug-in names its hosts)."""
  for plugin in enabled_plugins(config):
    plugin.check_config(config)


def build(config, captures=()):
  """The Framework of `config`, with its enabled plug-ins (and extra `captures` for analyses)."""
  return FRAMEWORKS[config.framework](config, plugins=enabled_plugins(config), captures=captures)
