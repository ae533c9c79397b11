"""PaliGemma-2 3B at 224 px with the `m3` connector (the paper's recipe; see recipe.py)."""

from configs.paligemma2 import recipe


def get_config(arg=None):
  del arg
  return recipe.make_config("m3", image_size=224)
