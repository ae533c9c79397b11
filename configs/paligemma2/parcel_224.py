"""PaliGemma-2 3B at 224 px with the `parcel` connector (the paper's recipe; see recipe.py)."""

from configs.paligemma2 import recipe


def get_config(arg=None):
  del arg
  return recipe.make_config("parcel", image_size=224)
