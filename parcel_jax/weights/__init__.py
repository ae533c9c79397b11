"""Real weights: Hugging Face PaliGemma checkpoints and big_vision npz files -> our params.

``config.init`` (optional in a config; '' = random initialisation):
  init.hf_checkpoint        a Hugging Face PaliGemma / PaliGemma-2 checkpoint directory
  init.big_vision_npz       a big_vision-layout .npz (see ``big_vision``)
  init.dims_from_checkpoint True: model dimensions come from the checkpoint's config.json
                            (``hf.config_from_hf``), overriding config.model.{vision,decoder}
Nothing is ever downloaded: paths come from the config.
"""

from __future__ import annotations

from absl import logging

from parcel_jax.weights import big_vision, common, hf  # noqa: F401
from parcel_jax.weights.common import WeightsError  # noqa: F401


def init_fields(config) -> tuple[str, str]:
  """(hf_checkpoint, big_vision_npz) of ``config.init`` ('' when absent)."""
  init = config.get("init")
  if init is None:
    return "", ""
  hf_dir, npz = init.get("hf_checkpoint", ""), init.get("big_vision_npz", "")
  if hf_dir and npz:
    raise ValueError("init.hf_checkpoint and init.big_vision_npz are both set; choose one")
  return hf_dir, npz


def apply_checkpoint_dims(config) -> None:
  """With ``init.hf_checkpoint`` and ``init.dims_from_checkpoint``: model dims from its config.json."""
  hf_dir, _ = init_fields(config)
  if hf_dir and config.init.get("dims_from_checkpoint", True):
    overrides = hf.config_from_hf(hf_dir)
    for entry in config.init.get("keep", ()):
      section, _, field = str(entry).partition(".")
      if section not in overrides or not field:
        raise ValueError(f"init.keep entry {entry!r} must be 'vision.<field>' or 'decoder.<field>'")
      overrides[section].pop(field, None)
    hf.apply_overrides(config.model, overrides)


def load_init_params(config, params, model_cfg):
  """``params`` with the weights named by ``config.init`` (unchanged when none is named).

  The replaced arrays of ``params`` are deleted as loading goes (device memory peaks at
  one extra parameter); connector arrays are kept and reused."""
  hf_dir, npz = init_fields(config)
  if hf_dir:
    logging.info("initialising from Hugging Face checkpoint %s", hf_dir)
    return hf.load_hf_checkpoint(hf_dir, params, model_cfg, donate=True)
  if npz:
    logging.info("initialising from big_vision npz %s", npz)
    return big_vision.load_npz(npz, params, model_cfg, donate=True)
  return params
