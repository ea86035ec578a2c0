"""Conversions between mimjax parameters and PyTorch checkpoints (timm, MAE, CLIP)."""
