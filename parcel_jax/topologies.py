"""Named TPU slices for compile-only checks: topology descriptions, HBM and peak FLOP/s per chip.

Names follow Cloud TPU accelerator types: v4 and v5p count TensorCores (two per chip,
one "megacore" JAX device), v5e and v6e count chips. So ``v4-512`` is 256 v4 chips
(``v4:4x8x8``), ``v5e-256`` is 256 v5e chips (``v5e:16x16``). A raw libtpu topology
string (``v4:8x8x4``) is accepted too.

libtpu builds the device list without TPU hardware (``jax.experimental.topologies``); the
process keeps computing on the CPU. ``TPU_SKIP_MDS_QUERY=1`` stops libtpu from asking a
metadata server that a CPU machine does not have.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int            # per chip (one JAX device)
  peak_bf16_flops: float    # per chip, dense bf16 matmul
  chip_config: str          # libtpu chip_config_name
  dims: int                 # topology rank: 3 (v4, v5p: a 3-D torus) or 2 (v5e, v6e)
  cores_per_chip: int       # in the accelerator-type name's count

GIB = 1 << 30

CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, "megacore", 3, 2),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, "megacore", 3, 2),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, "default", 2, 1),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, "default", 2, 1),
}

# Chips -> torus shape, as Cloud TPU lays out its slices.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str          # as given (``v4-512`` or ``v4:8x8x4``)
  generation: str    # key of CHIPS
  shape: str         # libtpu topology shape, e.g. 4x8x8

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def num_chips(self) -> int:
    n = 1
    for s in self.shape.split("x"):
      n *= int(s)
    return n

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host: 2 x 2 (4-chip hosts), or the whole slice when it is smaller."""
    dims = [int(s) for s in self.shape.split("x")]
    return (min(2, dims[0]), min(2, dims[1]), 1)

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation}:{self.shape}"


def named_topologies() -> dict[str, Topology]:
  """Every accelerator-type name this module knows, e.g. ``v4-8`` ... ``v4-4096``."""
  out = {}
  for gen, chip in CHIPS.items():
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    for chips, shape in shapes.items():
      name = f"{gen}-{chips * chip.cores_per_chip}"
      out[name] = Topology(name, gen, shape)
  return out


def parse(name: str) -> Topology:
  """``v4-512`` / ``v5e-256`` (accelerator types) or ``v4:8x8x4`` (libtpu); ValueError lists
  the known names."""
  known = named_topologies()
  if name in known:
    return known[name]
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
  if m and len(m.group(2).split("x")) == CHIPS[m.group(1)].dims:
    return Topology(name, m.group(1), m.group(2))
  raise ValueError(f"--topology={name!r} is unknown; use an accelerator type ({', '.join(known)}) "
                   "or a libtpu topology such as v4:8x8x4 / v5e:16x16")


def devices(topology: Topology):
  """The slice's JAX devices (compile-only: nothing runs on them). Needs libtpu."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compile-only use never holds a TPU, so several processes (parallel tests) may load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies as jax_topologies
    desc = jax_topologies.get_topology_desc(
        platform="tpu", topology_name=topology.libtpu_name, chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.host_bounds, num_slices=1)
  except Exception as e:  # libtpu missing or refusing the shape: say which and how to install it
    raise RuntimeError(f"cannot describe TPU topology {topology.libtpu_name} ({e}); compile-only "
                       "checks need libtpu: pip install 'jax[tpu]==0.10.2'") from e
  return desc.devices
