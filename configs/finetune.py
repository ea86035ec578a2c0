r"""End-to-end fine-tuning of a pre-trained encoder, as each pre-training method's paper ran it.

  python -m mimjax.evaluate --workdir DIR --protocol finetune      # derives this config from DIR
  python -m mimjax.evaluate --workdir DIR --protocol finetune --print_config   # shows it, no run
  python -m mimjax.train --config configs/finetune.py:model=B/16,recipe=simmim --workdir FT \
      --config.init.checkpoint=PRETRAIN_WORKDIR

The recipes (MAE's `main_finetune.py` with each method's own values) are stated in
`mimjax/finetune_recipes.py`; docs/recipes.md lists every value against the papers and the
reference code. The evaluation picks the recipe of the pre-training run
(`Framework.finetune_recipe`) unless `recipe=` is given. A pre-trained relative position bias of
any kind is fine-tuned per block, each block's table starting from its own plus the shared one
(BEiT's and DTM's `--init_both_rpb`, SimMIM's `load_pretrained`).
Arguments: model=<variant>, recipe=<mae, mae_lut, mae_mto, simmim, simmim_mto, distill,
distill_dtm>, epochs=<int> (default: MAE's per size), runlocal (Fashion-MNIST, a small ViT,
minutes on 2 CPU cores). Sizes MAE does not fine-tune (Ti, S, ...) take B's values; the other
recipes are their papers' ViT-B values at every size.
"""
from mimjax import finetune_recipes


def get_config(arg=None):
  return finetune_recipes.from_arg(arg)
