"""mimjax: masked image modeling in JAX. Importing it keeps TensorFlow's start-up banners off the
console (mimjax/console.py)."""
from mimjax import console

console.quiet_tensorflow_import()
