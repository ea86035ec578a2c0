"""Frameworks: each owns a trainable module and a base objective (see `base.Framework`)."""
