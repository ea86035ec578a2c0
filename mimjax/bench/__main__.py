"""`python -m mimjax.bench`: see `mimjax.bench.runner`."""
from mimjax.bench import cli
from mimjax.bench import runner

if __name__ == '__main__':
  cli.run(runner.define_flags, runner.main)
