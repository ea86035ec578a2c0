"""The benchmark command (`python -m mimjax.bench`): step time, FLOPs and the PyTorch peer."""
