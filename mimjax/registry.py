"""The one place naming every framework and plug-in: `config.framework` -> class, plug-ins by
config.

Adding a framework or a plug-in is one new module plus one line here (see docs/design.md).
"""
from mimjax.frameworks import distill
from mimjax.frameworks import mae
from mimjax.frameworks import simmim
from mimjax.frameworks import supervised
from mimjax.plugins import dtm
from mimjax.plugins import lut
from mimjax.plugins import mto
from mimjax.plugins import tokenprop

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


def build(config, captures=()):
  """The Framework of `config`, with its enabled plug-ins (and extra `captures` for analyses)."""
  return FRAMEWORKS[config.framework](config, plugins=enabled_plugins(config), captures=captures)
