"""Elastic visual connectors: ViT feature grid + budget -> visual tokens + validity mask.

Every method is one module with the same call::

    tokens, mask = connector(features, bucket, budgets)
    # features (batch, grid, grid, width); bucket: budgets.Bucket (static);
    # budgets (batch,) int32 -> tokens (batch, bucket.num_slots, width), mask (batch, num_slots)

Token layout is always ``[anchors (bucket.num_anchors, raster order); query slots]``. Query
slot ``i`` of an example is valid iff ``i < budget - num_anchors``. Invalid slots never
attend, are never attended to, are zero, and receive zero gradient.

One file per method (``parcel``, ``m3``, ``mqt``, ``none``, ...), each one
``base.Connector`` class that also owns the method's budget space, routing, bank size and
cost-model FLOPs, and one frozen config dataclass of the ``model.connector`` fields it reads.
Every module of this package is imported here, so a new file is a new method; nothing else
lists the methods.

``model.connector`` stays one flat section (command-line overrides such as
``--config.model.connector.routing=fixed4x4`` name fields directly): ``ConnectorConfig`` is
that section as a dataclass, the union of every method's fields, and ``method_config()``
projects it onto the chosen method. A field another method reads, set to anything but its
default, is an error naming the field and both methods (the shared sizes ``num_heads`` and
``mlp_dim`` excepted: a method without attention ignores them).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Mapping

from flax import nnx

from parcel_jax.models.connectors import base, blocks
from parcel_jax.models.connectors.base import MethodConfig, avg_pool, method_class, method_names

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  if not _module.startswith("_"):
    importlib.import_module(f"{__name__}.{_module}")

from parcel_jax.models.connectors.blocks import (  # noqa: E402  (re-exported: the shared blocks)
    CONDITIONINGS, KEY_MODES, KEY_POS, QueryResampler)
from parcel_jax.models.connectors.m3 import M3  # noqa: E402
from parcel_jax.models.connectors.mqt import MQT  # noqa: E402
from parcel_jax.models.connectors.none import Uncompressed  # noqa: E402
from parcel_jax.models.connectors.parcel import ANCHOR_POS, Parcel  # noqa: E402

CONNECTORS = {name: method_class(name) for name in method_names()}


def _owned_fields() -> dict[str, tuple[dataclasses.Field, tuple[str, ...]]]:
  """Every method field (not ``base.MODEL_FIELDS``): its declaration and the methods reading it.
  Two methods declaring one field must agree on its default and on whether it is shared."""
  out: dict[str, tuple[dataclasses.Field, tuple[str, ...]]] = {}
  for name, cls in CONNECTORS.items():
    for f in dataclasses.fields(cls.Config):
      if f.name in base.MODEL_FIELDS:
        continue
      if f.name in out:
        seen, owners = out[f.name]
        if (seen.default, seen.metadata.get(base.SHARED)) != (f.default, f.metadata.get(base.SHARED)):
          raise TypeError(f"model.connector.{f.name} is declared by {owners} and {name!r} with "
                          "different defaults (or sharing)")
        out[f.name] = (seen, owners + (name,))
      else:
        out[f.name] = (f, (name,))
  return out


_FIELDS = _owned_fields()


def method_field_defaults(method: str) -> dict[str, object]:
  """The defaults of every ``model.connector`` field that ``method`` does not read (shared
  sizes excepted): what a config switched to ``method`` must hold in those fields."""
  own = {f.name for f in dataclasses.fields(method_class(method).Config)}
  return {name: f.default for name, (f, _) in _FIELDS.items()
          if name not in own and not f.metadata.get(base.SHARED)}


class _Section:
  """Behaviour of ``ConnectorConfig`` (its fields are generated from the registered methods)."""

  def __post_init__(self):
    self.method_config()

  def method_config(self) -> MethodConfig:
    """The chosen method's own config; refuses another method's field set off its default."""
    cls = method_class(self.method)
    own = {f.name for f in dataclasses.fields(cls.Config)}
    for name, (f, owners) in _FIELDS.items():
      value = getattr(self, name)
      if name in own or f.metadata.get(base.SHARED) or value == f.default:
        continue
      reads = sorted(own - set(base.MODEL_FIELDS)) or ["no model.connector field"]
      raise ValueError(f"model.connector.{name}={value!r} is a field of method "
                       f"{' / '.join(repr(o) for o in owners)}, not of method {self.method!r} "
                       f"(which reads {', '.join(reads)}); leave it at {f.default!r}")
    return cls.Config(**{name: getattr(self, name) for name in own})


ConnectorConfig = dataclasses.make_dataclass(
    "ConnectorConfig",
    [("method", str), ("width", int), ("grid_size", int)]
    + [(name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
       for name, (f, _) in _FIELDS.items()]
    + [(f.name, f.type, dataclasses.field(default=f.default))
       for f in dataclasses.fields(MethodConfig) if f.name not in ("method", "width", "grid_size")],
    bases=(_Section,), frozen=True, kw_only=True)
ConnectorConfig.__module__ = __name__
ConnectorConfig.__doc__ = ("The flat ``model.connector`` section (every method's fields) plus the "
                           "model's width / grid / dtypes; ``method_config()`` is what a module reads.")
SECTION_FIELDS = tuple(f.name for f in dataclasses.fields(ConnectorConfig)
                       if f.name not in ("width", "grid_size"))


def method_config(method: str, *, grid_size: int, width: int = 0, **fields) -> MethodConfig:
  """``method``'s config from flat ``model.connector`` fields (the others at their defaults)."""
  return ConnectorConfig(method=method, width=width, grid_size=grid_size, **fields).method_config()


def config_from_section(section: Mapping, *, grid_size: int, width: int = 0) -> MethodConfig:
  """The method config of a ``model.connector`` ConfigDict / dict; keys read elsewhere
  (``budgets``, ``query_bucket``) are skipped (``vlm.model_config`` refuses unknown ones)."""
  fields = {k: v for k, v in section.items() if k in SECTION_FIELDS and k != "method"}
  return method_config(section["method"], grid_size=grid_size, width=width, **fields)


def make_connector(cfg, *, rngs: nnx.Rngs) -> base.Connector:
  """The module of ``cfg`` (a ``ConnectorConfig`` or a method's own config)."""
  if isinstance(cfg, _Section):
    cfg = cfg.method_config()
  return method_class(cfg.method)(cfg, rngs=rngs)


__all__ = ["ANCHOR_POS", "CONDITIONINGS", "CONNECTORS", "KEY_MODES", "KEY_POS", "M3", "MQT",
           "ConnectorConfig", "MethodConfig", "Parcel", "QueryResampler", "Uncompressed", "avg_pool",
           "base", "blocks", "config_from_section", "make_connector", "method_class", "method_config",
           "method_names"]
