"""Device mesh, logical-axis -> mesh-axis rules, and multi-host start-up (one place for sharding).

Parameters carry logical axis names (see ``models/layers.py``); a rules table maps
each to a mesh axis, a tuple of mesh axes, or None (= replicated), MaxText style.
``config.mesh.rules`` overrides entries of ``DEFAULT_RULES``. A dimension is only
sharded when the mesh axes' size divides it, so tiny models run on any mesh.

Multi-host: ``initialize_distributed`` wraps ``jax.distributed.initialize``; it is
called from ``train.main()`` only, never at import (Grain workers re-import modules).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# FSDP shards the model dimension of every matrix over 'fsdp'; tensor parallelism
# splits heads / MLP hidden / vocabulary over 'tensor'.
DEFAULT_RULES = (
    ("embed", "fsdp"),       # model width (ViT, connector, decoder)
    ("llm_embed", "fsdp"),   # decoder width on the vision -> LLM projection
    ("mlp", "tensor"),       # MLP hidden
    ("heads", "tensor"),     # attention query heads
    ("kv_heads", "tensor"),  # attention key/value heads
    ("vocab", "tensor"),     # decoder embedding rows (tied output layer)
    ("head_dim", None),
    ("queries", None),       # connector query bank
    ("tokens", None),        # learned position embeddings
    ("norm", None),          # norm scales and biases
    ("layers", None),        # stacked (scanned) layer axis: never sharded
    # Activations (``constrain``): split by the batch over every data-parallel axis, FSDP
    # included (FSDP gathers a layer's weights, never the activations); heads, MLP hidden
    # and vocabulary follow their weights over 'tensor'; length and width stay whole.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

Rules = Sequence[tuple[str, Any]]


# ------------------------------------------------------------------- mesh

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
  """A (data, fsdp, tensor) mesh with Auto axes over ``devices`` (default: all, every process)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(shape, len(devices))
  try:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except ValueError as e:  # a TPU torus whose sides cannot form these axis sizes
    raise ValueError(f"mesh.shape={tuple(sizes)} does not map onto the devices' physical "
                     f"layout: {e}") from e


def batch_shards(mesh) -> int:
  """Number of ways the batch dimension is split (data x fsdp)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


# ------------------------------------------------------------------ rules

def _axes(axis) -> tuple[str, ...]:
  """A rule's target as a tuple of mesh axes: None/'' -> (), 'fsdp' -> ('fsdp',)."""
  if axis is None or axis == "":
    return ()
  if isinstance(axis, str):
    return (axis,)
  return tuple(axis)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, Any], ...]:
  """``DEFAULT_RULES`` with ``mesh_cfg.rules`` entries replacing those of the same name.

  Each entry of ``mesh.rules`` is ``(logical_name, target)`` with target a mesh axis
  name, a tuple of them (e.g. ``('data', 'fsdp')`` for ZeRO-3 over both), or ''/None
  for replicated. Errors name the field, the entry and the allowed values.
  """
  overrides = mesh_cfg.get("rules", ()) if mesh_cfg is not None else ()
  table = dict(DEFAULT_RULES)
  for entry in overrides or ():
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f"mesh.rules entry {entry!r} must be a (logical_name, mesh_axis) pair")
    name, axis = entry
    if name not in table:
      raise ValueError(f"mesh.rules entry {tuple(entry)!r}: logical name {name!r} is unknown; "
                       f"allowed: {', '.join(table)}")
    bad = [a for a in _axes(axis) if a not in MESH_AXES]
    if bad or len(set(_axes(axis))) != len(_axes(axis)):
      raise ValueError(f"mesh.rules entry {tuple(entry)!r}: mesh axis {axis!r} is invalid; allowed: "
                       f"'' (replicated), one of {MESH_AXES} or a tuple of distinct ones")
    table[name] = None if not _axes(axis) else (axis if isinstance(axis, str) else tuple(axis))
  return tuple(table.items())


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh,
                    rules: Rules | None = None) -> P:
  """PartitionSpec for one array from its logical axis names.

  A dimension stays unsharded when its rule is None, when a mesh axis it maps to is
  already used by an earlier dimension, or when the axes' total size does not divide it.
  """
  if not names:
    return P()
  table = dict(DEFAULT_RULES if rules is None else rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axes = _axes(table.get(name))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or used & set(axes) or dim % size:
      spec.append(None)
    else:
      spec.append(axes[0] if len(axes) == 1 else axes)
      used.update(axes)
  return P(*spec)


def undivided_dims(names, shape, mesh, rules: Rules | None = None) -> list[tuple[str, int, int]]:
  """(logical name, size, mesh-axes size) of each dimension whose rule names mesh axes that
  do not divide it, so that ``logical_to_spec`` leaves it whole."""
  table = dict(DEFAULT_RULES if rules is None else rules)
  out = []
  for name, dim in zip(names or (), shape):
    axes = _axes(table.get(name))
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and size > 1 and dim % size:
      out.append((name, int(dim), size))
  return out


def param_shardings(abstract_state: nnx.State, mesh, rules: Rules | None = None):
  """NamedShardings (pure-dict tree) for an abstract ``nnx.State`` with logical names.

  Logs a warning when a sizeable share of the parameters stays replicated because the mesh
  axes do not divide their dimensions (e.g. a 1152-wide ViT under 256-way FSDP: every chip
  then holds all of it, and its optimizer state)."""
  whole = {"bytes": 0, "total": 0, "example": None}

  def one(var):
    names = var.get_metadata().get("out_sharding")
    spec = logical_to_spec(names, var.shape, mesh, rules)
    nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
    whole["total"] += nbytes
    shards = int(np.prod([mesh.shape[a] for ax in spec if ax for a in _axes(ax)]))
    if shards == 1 and undivided_dims(names, var.shape, mesh, rules):
      whole["bytes"] += nbytes
      whole["example"] = whole["example"] or (names, tuple(var.shape),
                                              undivided_dims(names, var.shape, mesh, rules)[0])
    return NamedSharding(mesh, spec)
  tree = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if whole["total"] and whole["bytes"] > 0.05 * whole["total"]:
    names, shape, (name, dim, size) = whole["example"]
    logging.warning(
        "%.0f%% of the parameters (%.2f GiB) are replicated on every device: the mesh axes do "
        "not divide them (e.g. a %s parameter: %s=%d is no multiple of %d mesh devices). A mesh whose fsdp size "
        "divides the model widths (mesh.shape) or mesh.rules shards them.",
        100 * whole["bytes"] / whole["total"], whole["bytes"] / 2**30, shape, name, dim, size)
  return nnx.to_pure_dict(tree)


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def optimizer_shardings(opt_state_shapes, params_shapes, params_shardings, mesh):
  """Shardings for an optimizer state (``jax.eval_shape(tx.init, params)``).

  Every state leaf that mirrors a parameter (Adam's mu/nu, inside any chain or
  partition) gets that parameter's sharding: its key path ends with the parameter's
  path and the shapes agree. Everything else (step counts, scalars) is replicated.
  ``optax.tree_map_params`` cannot do this across ``optax.partition``'s masked states.
  """
  table = {}
  for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(params_shapes),
                                     jax.tree.leaves(params_shardings)):
    table[_path_keys(path)] = (tuple(shape.shape), sharding)
  rep = replicated(mesh)

  def one(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      hit = table.get(keys[start:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return rep
  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


def tree_shardings(tree):
  """The ``.sharding`` of every array of a pytree."""
  return jax.tree.map(lambda x: x.sharding, tree)


# ------------------------------------------------------------ activations
# The modules mark their activations with logical names (``constrain``); the mesh and the
# rules table come from the tracing context (``activation_sharding``), so a model traced
# without one (a single device, tests, tools) carries no constraint at all.

_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules", default=None)

BTD = ("activation_batch", "activation_length", "activation_embed")


@contextlib.contextmanager
def activation_sharding(mesh, rules: Rules | None = None):
  """Within this context, ``constrain`` pins activations to ``mesh`` through ``rules``
  (default ``DEFAULT_RULES``). Enter it around tracing (``jit(...).lower``/the first call);
  the mesh is part of jit's cache key, so programs traced outside it stay unconstrained."""
  token = _ACTIVATION_RULES.set(tuple(DEFAULT_RULES if rules is None else rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain(x, names: Sequence[str | None]):
  """``with_sharding_constraint`` of activation ``x`` by logical axis ``names`` (one per
  dimension) under the current ``activation_sharding`` context; a no-op outside one.
  A dimension its mesh axes do not divide stays unsharded (``logical_to_spec``)."""
  rules = _ACTIVATION_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain_batch(x, mesh, axis: int = 0):
  """``with_sharding_constraint``: dimension ``axis`` of ``x`` split over (data, fsdp),
  the rest replicated; a no-op when the batch shards do not divide that dimension."""
  if mesh is None or x.ndim <= axis or x.shape[axis] % batch_shards(mesh):
    return x
  spec = [None] * x.ndim
  spec[axis] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


# -------------------------------------------------------------- multi-host

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Starts JAX's multi-controller runtime; returns whether it was started.

  Explicit: all three of ``coordinator_address`` ('host:port' of process 0),
  ``num_processes`` and ``process_id``. ``auto=True``: ``jax.distributed.initialize()``
  detects the cluster (Cloud TPU pod, SLURM, Open MPI) and fills in what is not given.
  Neither: nothing happens (one process; safe on a plain CPU). Must run before any
  JAX computation. CPU processes exchange collectives through gloo.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if not auto and all(v is None for v in given.values()):
    return False
  if not auto and any(v is None for v in given.values()):
    missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
    raise ValueError(f"multi-process training needs --coordinator_address, --num_processes and "
                     f"--process_id together (missing: {missing}), or --distributed for "
                     "cluster auto-detection")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  # Harmless on GPU/TPU (it only configures the CPU client); needed for CPU processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**given)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
