"""PaliGemma-2 3B at 448 px (32 x 32 grid) with PARCEL: budgets 16..1024, a third routing regime
(256 anchors), a 768-query bank; evaluated at 64 / 256 / 1024 tokens (see recipe.py)."""

from configs.paligemma2 import recipe


def get_config(arg=None):
  del arg
  return recipe.make_config("parcel", image_size=448)
