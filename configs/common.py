"""What the recipes share: the schema and the helpers, which live in the package.

Every field and its default is in the package: the core sections in `mimjax/schema.py`, each
framework's and plug-in's own on its class (`config_fields`), all assembled by
`mimjax/config_lib.py:base_config`; the helpers (`parse_arg`, `steps_for_epochs`, `apply_runlocal`,
MoTo's stem per size) in `mimjax/recipe_lib.py`, because the library builds the fine-tuning recipe
itself. A recipe starts from `base_config()` and sets values; it never adds keys.
"""
from mimjax.config_lib import base_config  # noqa: F401
from mimjax.recipe_lib import apply_moto_stem  # noqa: F401
from mimjax.recipe_lib import apply_runlocal  # noqa: F401
from mimjax.recipe_lib import parse_arg  # noqa: F401
from mimjax.recipe_lib import steps_for_epochs  # noqa: F401
