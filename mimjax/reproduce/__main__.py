"""`python -m mimjax.reproduce`: see `mimjax.reproduce.study`."""
from absl import app

from mimjax.reproduce import study

if __name__ == '__main__':
  study.define_flags()
  app.run(study.main)
