"""Plug-in methods (losses as pure functions of arrays, plus their `base.Plugin`).

Importing the framework registry first lets a method module be imported on its own: the registry
imports every plug-in, and each plug-in imports `mimjax.frameworks.base`.
"""
from mimjax import frameworks  # noqa: F401  pylint: disable=unused-import
