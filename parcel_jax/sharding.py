"""Device mesh and the logical-axis -> mesh-axis rules (one place for sharding).

Parameters carry logical axis names (see ``models/layers.py``); ``config.mesh.rules``
maps each to a mesh axis (or None = replicated), MaxText style. A dimension is
only sharded when the mesh axis size divides it, so tiny models run on any mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP shards the model dimension of every matrix over 'fsdp'; tensor parallelism
# splits heads / MLP hidden / vocabulary over 'tensor'.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("llm_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("queries", None),
    ("tokens", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 entry to "the remaining devices" and checks the product."""
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape={tuple(shape)} needs {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={tuple(shape)}: entries are positive, with at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={tuple(shape)} does not divide the {num_devices} available devices")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh.shape={tuple(shape)} uses {int(np.prod(shape))} devices but "
                     f"{num_devices} are available")
  return tuple(shape)


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(shape, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh, rules) -> P:
  """PartitionSpec for one array from its logical axis names."""
  if not names:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axis = table.get(name)
    if axis is None or axis in used or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def param_shardings(abstract_state: nnx.State, mesh, rules=DEFAULT_RULES):
  """NamedShardings (pure-dict tree) for an abstract ``nnx.State`` with logical names."""
  def one(var):
    names = var.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))
  tree = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
