"""The elastic connector (PARCEL / M3 / MQT) as a file of its own, next to an exported backbone.

No PaliGemma format holds the connector, so ``export_connector`` writes it beside one:

  connector.safetensors   every ``connector/...`` parameter under its own path as tensor name
                          (the '/'-joined ``nnx.to_pure_dict`` keys, e.g.
                          ``connector/queries``, ``connector/blocks/0/attn/q_kernel``), in
                          the model's layout and dtype; header metadata
                          ``{"format": "parcel_jax.connector", "method": ...}``
  connector.json          the connector's config: ``"connector"`` = the fields of
                          ``connectors.ConnectorConfig`` (method, width, grid_size, num_heads,
                          ...), ``"config"`` = the run's ``model.connector`` section (budgets)

``load_connector`` reads it back into a model's params (``init.connector_safetensors``):
every connector parameter must be in the file with its shape, nothing else may be, and
a ``connector.json`` beside it must agree with the model's connector config (the error
names the field). Values are copied bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from parcel_jax.weights import common, hf
from parcel_jax.weights.common import Source, WeightsError

FILE = "connector.safetensors"
CONFIG_FILE = "connector.json"
FORMAT = "parcel_jax.connector"
_NOT_CHECKED = ("dtype",)  # the compute dtype does not change the parameters


def connector_fields(connector_cfg) -> dict[str, Any]:
  """``ConnectorConfig`` as JSON-able values (dtypes by name)."""
  out = {}
  for f in dataclasses.fields(connector_cfg):
    value = getattr(connector_cfg, f.name)
    out[f.name] = value if value is None or isinstance(value, (bool, int, float, str)) else np.dtype(value).name
  return out


def export_connector(params, model_cfg, out_dir: str, *,
                     run_connector_config: Mapping[str, Any] | None = None) -> list[common.Written]:
  """Writes ``out_dir/connector.safetensors`` and ``out_dir/connector.json`` (module
  docstring); nothing for method 'none'. M3 (pooling only) has no parameters: its file
  holds no tensor, and the JSON still records the method and its budgets."""
  if model_cfg.connector.method == "none":
    return []
  flat = {p: x for p, x in common.host_params(params).items() if p.startswith("connector/")}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, FILE)
  meta = {"format": FORMAT, "method": str(model_cfg.connector.method)}
  written = [common.Written(path, len(flat), common.write_safetensors(path, flat, meta))]
  config = {"connector": connector_fields(model_cfg.connector)}
  if run_connector_config is not None:
    config["config"] = dict(run_connector_config)
  written.append(common.write_json(os.path.join(out_dir, CONFIG_FILE), config))
  return written


def check_config(path: str, model_cfg) -> None:
  """Raises WeightsError naming the first ``model.connector`` field on which the
  ``connector.json`` beside ``path`` disagrees with ``model_cfg`` (no file: no check)."""
  file = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
  if not os.path.exists(file):
    return
  saved = hf.read_config(file).get("connector")
  if not isinstance(saved, dict):
    raise WeightsError(f"{file}: no 'connector' section")
  ours = connector_fields(model_cfg.connector)
  for name, value in saved.items():
    if name in _NOT_CHECKED:
      continue
    if name not in ours:
      raise WeightsError(f"{file}: connector field {name!r} is not one of this model's")
    if ours[name] != value:
      raise WeightsError(f"{file}: the connector was exported with model.connector.{name}={value!r}; "
                         f"this model has {ours[name]!r}")


def load_connector(path: str, params, model_cfg, *, shardings=None, donate: bool = False):
  """``params`` with every ``connector/...`` parameter from ``path`` (``export_connector``),
  placed on its sharding; the other parameters are kept as they are."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such connector file (init.connector_safetensors)")
  check_config(path, model_cfg)
  store = common.SafetensorsStore([path])
  mapping = {k: Source((k,)) for k in store.keys() if k.startswith("connector/")}
  return common.assemble(params, mapping, store, model_cfg, shardings=shardings,
                         allow_missing=(r"^(?!connector/)",), source_desc=path, donate=donate)
