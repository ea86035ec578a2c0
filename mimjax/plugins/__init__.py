"""Plug-ins: loss terms added to a framework's objective (see `frameworks.base.Plugin`)."""
