"""Figures of the analyses, drawn with matplotlib's Agg backend (no display needed)."""
import jax
import numpy as np

from mimjax import workdir_io


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path):
  """Writes the figure (a PNG, locally or to a gs:// workdir) from process 0 only (every process
  of a job draws the same one)."""
  if jax.process_index() == 0:
    with workdir_io.path(path).open('wb') as f:
      fig.savefig(f, format='png', dpi=120)
  plt.close(fig)


def per_layer_heads(values, path, ylabel, title):
  """values [layers, heads]: one dot per head, the head mean as a line, layers on the x axis."""
  plt = _pyplot()
  values = np.asarray(values)
  layers = np.arange(1, values.shape[0] + 1)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for h in range(values.shape[1]):
    ax.scatter(layers, values[:, h], s=12, alpha=0.6)
  ax.plot(layers, values.mean(axis=1), color='black', label='mean over heads')
  ax.set(xlabel='layer', ylabel=ylabel, title=title, xticks=layers)
  ax.legend()
  fig.tight_layout()
  _save(plt, fig, path)
  return path


def curves(ys, labels, path, xlabel, ylabel, title, log_y=False, xs=None):
  """One line per entry of ys (each [n]) with its label."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, (y, label) in enumerate(zip(ys, labels)):
    x = np.arange(len(y)) if xs is None else xs[i]
    ax.plot(x, y, label=label)
  if log_y:
    ax.set_yscale('log')
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend(fontsize='small')
  fig.tight_layout()
  _save(plt, fig, path)
  return path
