"""Real weights: Hugging Face PaliGemma checkpoints and big_vision npz files <-> our params.

``config.init`` (optional in a config; '' = random initialisation):
  init.hf_checkpoint        a Hugging Face PaliGemma / PaliGemma-2 checkpoint directory
  init.big_vision_npz       a big_vision-layout .npz (see ``big_vision``)
  init.connector_safetensors  a ``connector.safetensors`` written by ``export`` (see
                            ``connector``): the connector's parameters, read after the
                            checkpoint above (or alone, over the initialisation); a
                            ``connector.json`` beside it must match model.connector
  init.dims_from_checkpoint True: model dimensions come from the checkpoint's config.json
                            (``hf.config_from_hf``), overriding config.model.{vision,decoder}
Nothing is ever downloaded: paths come from the config.

``export`` writes a model back out (``python -m parcel_jax.export``): format 'hf' is a
PaliGemma directory (``hf.export_hf``) plus, for parcel / m3 / mqt, the connector file
(``connector.export_connector``) and, for a run with a Gemma tokenizer, the tokenizer and
image processor files (``hf_processor.export_processor``); 'big_vision' one npz
(``big_vision.export_npz``).
"""

from __future__ import annotations

import os

from absl import logging

from parcel_jax.weights import big_vision, common, connector, hf, hf_processor  # noqa: F401
from parcel_jax.weights.common import WeightsError, Written  # noqa: F401

FORMATS = ("hf", "big_vision")
NPZ_FILE = "params.npz"


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
  """``params`` with the weights named by ``config.init`` (unchanged when none is named):
  the checkpoint, then the connector file.

  The replaced arrays of ``params`` are deleted as loading goes (device memory peaks at
  one extra parameter); connector arrays are kept and reused."""
  hf_dir, npz = init_fields(config)
  if hf_dir:
    logging.info("initialising from Hugging Face checkpoint %s", hf_dir)
    params = hf.load_hf_checkpoint(hf_dir, params, model_cfg, donate=True)
  elif npz:
    logging.info("initialising from big_vision npz %s", npz)
    params = big_vision.load_npz(npz, params, model_cfg, donate=True)
  connector_file = (config.get("init") or {}).get("connector_safetensors", "")
  if connector_file:
    logging.info("connector from %s", connector_file)
    params = connector.load_connector(connector_file, params, model_cfg, donate=True)
  elif hf_dir and os.path.exists(os.path.join(hf_dir, connector.FILE)):
    logging.warning("%s holds %s, which is not read: set init.connector_safetensors to load it",
                    hf_dir, connector.FILE)
  return params


def export(params, model_cfg, fmt: str, out_dir: str, *, run_connector_config=None,
           image_token_index: int | None = None, allow=(), max_shard_bytes: int = 0,
           tokenizer: str = "") -> list[Written]:
  """Writes ``params`` of a ``model_cfg`` model to ``out_dir`` in format ``fmt``.

  'hf': ``hf.export_hf`` (config.json, model.safetensors or shards), when the model has a
  connector ``connector.export_connector`` (connector.safetensors, connector.json with
  ``run_connector_config`` = the run's model.connector section), and with ``tokenizer`` (the
  run's Gemma ``data.tokenizer``; '' for none) ``hf_processor.export_processor``: its files
  and a preprocessor_config.json. ``image_token_index`` None: the tokenizer's ``<image>``
  when it has one, else ``hf.default_image_token``. 'big_vision': ``out_dir/params.npz``
  (``big_vision.export_npz``, connector included; no tokenizer). Returns the files written.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
  if fmt == "hf":
    gemma = hf_processor.open_tokenizer(tokenizer, model_cfg.decoder.vocab_size) if tokenizer else None
    if gemma is not None and image_token_index is None:
      image_token_index = gemma.piece_id(hf_processor.IMAGE_TOKEN)
    written = hf.export_hf(params, model_cfg, out_dir, image_token_index=image_token_index,
                           allow=allow, max_shard_bytes=max_shard_bytes)
    written += connector.export_connector(params, model_cfg, out_dir,
                                          run_connector_config=run_connector_config)
    if gemma is not None:
      written += hf_processor.export_processor(tokenizer, out_dir, tokenizer=gemma,
                                               image_size=model_cfg.vision.image_size,
                                               image_seq_length=model_cfg.vision.grid_size ** 2)
    return written
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, NPZ_FILE)
  shapes = big_vision.export_npz(params, model_cfg, path)
  return [Written(path, len(shapes), os.path.getsize(path))]
