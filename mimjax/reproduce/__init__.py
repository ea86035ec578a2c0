"""The small-scale reproduction study (`python -m mimjax.reproduce`, RESULTS.md)."""
