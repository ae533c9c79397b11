"""What every importer shares: parameter paths, scanned layouts, checked and sharded assembly.

An importer describes a checkpoint as a *mapping* from our parameter paths, in the
per-layer (``scan=False``) layout, to a :class:`Source`: the checkpoint tensor names it
needs and a numpy function that turns them into our layout. :func:`assemble` then
walks the model's parameter tree (per-layer or scanned), stacks per-layer sources for
scanned stacks, checks every shape, and builds each array directly on its mesh
sharding with ``jax.make_array_from_callback``: one host copy per parameter at a time,
and every device receives only its own slice.

Exporters walk the same mapping backwards: a Source may carry the ``inverse`` of its
conversion (our array -> its checkpoint tensors), and :func:`export_tensors` applies it to
every parameter, so the format's table is typed once (``hf.param_mapping``).

Paths are '/'-joined keys of the ``nnx.to_pure_dict`` tree, as in ``parcel_jax.optim``:
``vision/blocks/0/attn/q_kernel``, ``decoder/layers/3/mlp/wi``, ``projection/kernel``.

safetensors files are read and written with the ``safetensors`` package (numpy side,
memory-mapped reads). bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays and
are written as ``BF16`` (checked with safetensors 0.8; a release whose numpy side lacks
bfloat16 gives a WeightsError naming the file and the tensor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

# Parameters that a PaliGemma-style checkpoint never holds: the elastic connectors.
DEFAULT_ALLOW_MISSING = (r"^connector/",)


class WeightsError(ValueError):
  """A checkpoint does not fit the model (missing, unexpected or mis-shaped tensors)."""


def _identity(x):
  return x


@dataclasses.dataclass(frozen=True)
class Source:
  """How one of our parameters (per-layer layout) is computed from checkpoint tensors.

  ``inverse`` (for exporters) maps our array back to the checkpoint tensors: one array for
  one name, a tuple in ``names`` order for several. The identity conversion is its own
  inverse; any other ``fn`` without one cannot be exported."""
  names: tuple[str, ...]                        # checkpoint tensor names, in ``fn``'s order
  fn: Callable[..., np.ndarray] = _identity     # numpy arrays -> our layout
  inverse: Callable[[np.ndarray], Any] | None = None  # our layout -> the checkpoint tensors

  def __post_init__(self):
    if self.inverse is None and self.fn is _identity:
      object.__setattr__(self, "inverse", _identity)

  def describe(self) -> str:
    return self.names[0] if len(self.names) == 1 else "(" + ", ".join(self.names) + ")"


# ------------------------------------------------------------------------ trees

def key_str(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def flatten(tree) -> dict[str, Any]:
  """Pure-dict tree -> {'a/b/0/c': leaf}."""
  return {"/".join(key_str(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_like(template, flat: Mapping[str, Any]):
  """Inverse of ``flatten`` onto the structure of ``template``."""
  paths = [p for p in flatten(template)]
  leaves = [flat[p] for p in paths]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def per_layer_paths(path: str, model_cfg) -> list[str] | None:
  """The per-layer paths stacked into a scanned parameter, or None if ``path`` is not scanned.

  ``vision/blocks/attn/q_kernel`` (vision.scan) -> ``vision/blocks/{0..depth-1}/attn/q_kernel``;
  ``decoder/layers/local_layer/...`` (decoder.scan with local_global) -> layers 0, 2, 4, ...;
  ``decoder/layers/global_layer/...`` -> layers 1, 3, 5, ...; ``decoder/layers/...`` -> all.
  """
  parts = path.split("/")
  if parts[:2] == ["vision", "blocks"] and model_cfg.vision.scan:
    rest = "/".join(parts[2:])
    return [f"vision/blocks/{i}/{rest}" for i in range(model_cfg.vision.depth)]
  if parts[:2] == ["decoder", "layers"] and model_cfg.decoder.scan:
    depth = model_cfg.decoder.depth
    if model_cfg.decoder.local_global:
      kind, rest = parts[2], "/".join(parts[3:])
      layers = range(0, depth, 2) if kind == "local_layer" else range(1, depth, 2)
    else:
      rest, layers = "/".join(parts[2:]), range(depth)
    return [f"decoder/layers/{i}/{rest}" for i in layers]
  return None


# ------------------------------------------------------------------- tensor store

class TensorStore:
  """Lazy, read-only access to named checkpoint tensors (numpy)."""

  description = "checkpoint"

  def keys(self) -> Iterable[str]:
    raise NotImplementedError

  def __contains__(self, name: str) -> bool:
    return name in set(self.keys())

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self[name].shape)

  def __getitem__(self, name: str) -> np.ndarray:
    raise NotImplementedError


class DictStore(TensorStore):
  def __init__(self, tensors: Mapping[str, np.ndarray], description: str = "checkpoint"):
    self._tensors = dict(tensors)
    self.description = description

  def keys(self):
    return self._tensors.keys()

  def __contains__(self, name):
    return name in self._tensors

  def __getitem__(self, name):
    return np.asarray(self._tensors[name])


# safetensors dtype codes we read and write, and their numpy types.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _open_safetensors(path: str):
  """A ``safe_open`` handle (numpy, memory-mapped); WeightsError naming the file otherwise."""
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise WeightsError(f"{path}: cannot read the safetensors file ({e})") from e
  if size < 8:
    raise WeightsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
  try:
    return safetensors.safe_open(path, framework="numpy")
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise WeightsError(f"{path}: unreadable safetensors header ({e})") from e


class SafetensorsStore(TensorStore):
  """One or more ``.safetensors`` files, memory-mapped (no copy until a tensor is read)."""

  def __init__(self, files: Sequence[str]):
    self.description = ", ".join(files) if len(files) < 3 else f"{files[0]} (+{len(files) - 1} shards)"
    self._index: dict[str, tuple[str, tuple[int, ...]]] = {}   # name -> (file, shape)
    self._handles: dict[str, Any] = {}
    for path in files:
      handle = _open_safetensors(path)
      for name in handle.keys():
        info = handle.get_slice(name)
        if info.get_dtype() not in SAFETENSORS_DTYPES:
          raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info.get_dtype()}")
        if name in self._index:
          raise WeightsError(f"tensor {name} appears in both {self._index[name][0]} and {path}")
        self._index[name] = (path, tuple(info.get_shape()))
      self._handles[path] = handle

  def keys(self):
    return self._index.keys()

  def __contains__(self, name):
    return name in self._index

  def shape(self, name):
    return self._index[name][1]

  def __getitem__(self, name):
    path, _ = self._index[name]
    try:
      return self._handles[path].get_tensor(name)
    except (safetensors.SafetensorError, TypeError, KeyError, ValueError) as e:
      raise WeightsError(f"{path}: cannot read tensor {name} as numpy ({e})") from e


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Writes numpy tensors as one safetensors file (``safetensors.numpy.save_file``); returns
  its size in bytes. ``metadata``: the header's ``__metadata__`` (str -> str)."""
  out = {}
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype.type not in SAFETENSORS_DTYPES.values():
      raise WeightsError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
    out[name] = arr
  try:
    safetensors.numpy.save_file(out, path, metadata=dict(metadata) if metadata else None)
  except (safetensors.SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
    raise WeightsError(f"{path}: cannot write safetensors ({e!r})") from e
  return os.path.getsize(path)


@dataclasses.dataclass(frozen=True)
class Written:
  """One file an exporter wrote."""
  path: str
  tensors: int   # 0 for a JSON file
  bytes: int


def write_json(path: str, obj) -> Written:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  return Written(path, 0, os.path.getsize(path))


def write_safetensors_shards(out_dir: str, stem: str, tensors: Iterable[tuple[str, np.ndarray]],
                             max_shard_bytes: int = 0, metadata: Mapping[str, str] | None = None
                             ) -> list[Written]:
  """``stem.safetensors``, or with ``max_shard_bytes`` > 0 shards of at most that size (a
  larger tensor gets a shard of its own) ``stem-0000i-of-0000n.safetensors`` and
  ``stem.safetensors.index.json`` (``weight_map``: tensor -> shard file), as transformers
  writes them. Tensor names must be unique."""
  items = list(tensors)
  names = [n for n, _ in items]
  if len(set(names)) != len(names):
    raise WeightsError(f"tensor {next(n for n in names if names.count(n) > 1)} written twice")
  shards: list[list[tuple[str, np.ndarray]]] = [[]]
  size = 0
  for name, x in items:
    if max_shard_bytes > 0 and shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, x))
    size += x.nbytes
  if len(shards) == 1:
    path = os.path.join(out_dir, f"{stem}.safetensors")
    return [Written(path, len(items), write_safetensors(path, dict(items), metadata))]
  written, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    path = os.path.join(out_dir, file)
    written.append(Written(path, len(shard), write_safetensors(path, dict(shard), metadata)))
    weight_map.update({n: file for n, _ in shard})
  index = {"metadata": {"total_size": int(sum(x.nbytes for _, x in items))}, "weight_map": weight_map}
  written.append(write_json(os.path.join(out_dir, f"{stem}.safetensors.index.json"), index))
  return written


# ------------------------------------------------------------------------ assembly

def _to_dtype(x: np.ndarray, dtype) -> np.ndarray:
  if x.dtype.kind == "V" and x.dtype.itemsize == 2:  # bfloat16 stored as raw 2-byte voids
    x = x.view(ml_dtypes.bfloat16)
  return np.asarray(x, dtype=dtype)


def _sharding_of(leaf, shardings_leaf):
  if shardings_leaf is not None:
    return shardings_leaf
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    raise WeightsError("the parameter template has no shardings: pass arrays created on the mesh "
                       "(train.init_state) or shardings=sharding.param_shardings(...)")
  return sharding


def assemble(params, mapping: Mapping[str, Source], store: TensorStore, model_cfg, *,
             shardings=None, allow_missing: Sequence[str] = DEFAULT_ALLOW_MISSING,
             ignore_unused: Sequence[str] = (), source_desc: str | None = None,
             donate: bool = False):
  """Builds the parameter tree from ``store`` on the mesh.

  Args:
    params: pure-dict parameter tree (``nnx.to_pure_dict``) of the target model: jax arrays
      (their values are kept for parameters the checkpoint does not hold, their shardings
      are used) or ``jax.ShapeDtypeStruct``s with shardings.
    mapping: our per-layer path -> Source (see module docstring).
    store: the checkpoint's tensors.
    model_cfg: ``vlm.ModelConfig`` (for the scanned layouts).
    shardings: optional pure-dict tree of ``NamedSharding`` (``sharding.param_shardings``);
      default: each leaf's own ``.sharding``.
    allow_missing: regexes of our paths that may be absent from ``mapping``/the checkpoint
      and keep their value from ``params`` (default: the connector).
    ignore_unused: regexes of checkpoint names that may go unused (e.g. a MAP head).
    donate: delete each replaced array of ``params`` as soon as its successor exists, so
      device memory peaks at one extra parameter, not a second copy of the model.
  Raises:
    WeightsError naming the parameter (ours and the checkpoint's) and both shapes on a
    shape mismatch; the missing or unexpected names otherwise.
  """
  desc = source_desc or store.description
  flat = flatten(params)
  flat_shardings = flatten(shardings) if shardings is not None else {}
  used: set[str] = set()
  out, kept = {}, []
  for path, leaf in flat.items():
    layer_paths = per_layer_paths(path, model_cfg)
    sources = layer_paths if layer_paths is not None else [path]
    present = [p in mapping and all(n in store for n in mapping[p].names) for p in sources]
    if not any(present):
      if any(re.search(rx, path) for rx in allow_missing):
        if isinstance(leaf, jax.ShapeDtypeStruct):
          raise WeightsError(f"{desc}: has no tensor for {path} and the template holds no "
                             "initial value for it (pass initialised params)")
        out[path] = leaf
        kept.append(path)
        continue
      want = mapping[sources[0]].describe() if sources[0] in mapping else "(no mapping)"
      raise WeightsError(f"{desc}: missing parameter {path} (checkpoint name {want}); "
                         f"the model expects shape {tuple(leaf.shape)}")
    if not all(present):
      missing = [p for p, ok in zip(sources, present) if not ok]
      raise WeightsError(f"{desc}: missing {mapping[missing[0]].describe() if missing[0] in mapping else missing[0]} "
                         f"for {missing[0]} ({len(missing)} of {len(sources)} layers missing)")
    expected = tuple(leaf.shape[1:]) if layer_paths is not None else tuple(leaf.shape)

    def load_one(p, expected=expected, path=path):
      src = mapping[p]
      used.update(src.names)
      arr = np.asarray(src.fn(*[store[n] for n in src.names]))
      if tuple(arr.shape) != expected:
        shapes = ", ".join(f"{n} {store.shape(n)}" for n in src.names)
        raise WeightsError(f"{desc}: shape mismatch for parameter {p} (checkpoint {shapes}): "
                           f"the checkpoint gives {tuple(arr.shape)} but the model expects {expected}")
      return arr

    if layer_paths is None:
      host = _to_dtype(load_one(path), leaf.dtype)
    else:
      host = np.stack([_to_dtype(load_one(p), leaf.dtype) for p in layer_paths])
    sharding = _sharding_of(leaf, flat_shardings.get(path))
    out[path] = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    del host
    if donate and isinstance(leaf, jax.Array):
      leaf.delete()
  unused = [n for n in store.keys() if n not in used and not any(re.search(rx, n) for rx in ignore_unused)]
  if unused:
    shown = ", ".join(sorted(unused)[:8]) + (" ..." if len(unused) > 8 else "")
    raise WeightsError(f"{desc}: {len(unused)} checkpoint tensor(s) have no place in the model: {shown}")
  if kept:
    groups = sorted({"/".join(p.split("/")[:1]) for p in kept})
    logging.info("weights from %s; kept initialisation for %d parameters (%s)", desc, len(kept),
                 ", ".join(groups))
  return unflatten_like(params, out)


def export_tensors(flat: Mapping[str, np.ndarray], mapping: Mapping[str, Source]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """The inverse of ``assemble``: per-layer flat params -> (checkpoint name, tensor), in
  ``mapping``'s order. Every parameter of ``flat`` must have a place in ``mapping`` (the
  caller leaves out what the format does not hold) and every mapped path a value."""
  unplaced = [p for p in flat if p not in mapping]
  if unplaced:
    raise WeightsError(f"parameter {unplaced[0]} has no place in the checkpoint format"
                       + (f" (nor {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""))
  for path, src in mapping.items():
    if path not in flat:
      raise WeightsError(f"the parameters have no {path} (checkpoint name {src.describe()})")
    if src.inverse is None:
      raise WeightsError(f"{path}: the conversion to {src.describe()} has no inverse")
    out = src.inverse(np.asarray(flat[path]))
    out = (out,) if len(src.names) == 1 else tuple(out)
    for name, x in zip(src.names, out, strict=True):
      yield name, np.asarray(x)


def host_params(params) -> dict[str, np.ndarray]:
  """Flat {path: numpy array} of a (possibly sharded) parameter tree, per-layer layout."""
  return {p: np.asarray(jax.device_get(x)) for p, x in flatten(params).items()}


def unscan(flat: Mapping[str, np.ndarray], model_cfg) -> dict[str, np.ndarray]:
  """Flat params in the model's layout -> the per-layer layout (inverse of the stacking)."""
  out = {}
  for path, x in flat.items():
    layer_paths = per_layer_paths(path, model_cfg)
    if layer_paths is None:
      out[path] = x
    else:
      for i, p in enumerate(layer_paths):
        out[p] = x[i]
  return out


def checkpoint_files(path: str, index_name: str, single_name: str) -> list[str]:
  """The weight files of a checkpoint directory: an index's shards or the single file."""
  index = os.path.join(path, index_name)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise WeightsError(f"{index}: no 'weight_map' of tensor -> shard file")
    files = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise WeightsError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
    return files
  single = os.path.join(path, single_name)
  if os.path.exists(single):
    return [single]
  raise WeightsError(f"{path}: neither {index_name} nor {single_name} found")
