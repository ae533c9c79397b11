"""Host memory for XLA:CPU: reuse each step's buffers instead of mapping them afresh.

XLA:CPU allocates an execution's temporary buffer (every live activation of the step:
~660 MB for the embedded default's train step at B = 256) with ``malloc`` on its worker
threads. glibc serves a request that large on a thread's own arena with a fresh ``mmap``
and returns it with ``munmap`` on free, so every step faults in every page again: ~160 k
minor page faults per B = 256 step, a third of the step in the kernel (docs/RESULTS.md,
A8). With a single arena, no ``mmap`` for large blocks and no trimming, the freed block
stays in the heap and the next step reuses its pages.

This is process-wide and must run before JAX starts its backend (the worker threads attach
to arenas on their first allocation), so ``train.main`` calls it first; a later call sees the
threads' arenas (``arenas``) and changes nothing. It goes through glibc's own runtime interface
(``mallopt(3)``, ``malloc_info(3)``), not JAX's internals: the environment variables that set the
same parameters (``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES``) are read once at process start, too
late for a setting in the config. The default is ``system`` (glibc's own behaviour); the
embedded default sets ``auto``. It only pays on the
CPU backend; on accelerator hosts the step's buffers live on the device and one arena
would only serialise the input pipeline's threads, so ``auto`` leaves those alone.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import sys

import jax
from absl import logging

MODES = ("auto", "reuse", "system")

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  libc = ctypes.CDLL(None)   # the malloc this process already uses, not a library found anew
  names = ("gnu_get_libc_version", "mallopt", "malloc_info", "open_memstream")
  return libc if all(hasattr(libc, name) for name in names) else None


def arenas(libc: ctypes.CDLL) -> int:
  """How many malloc arenas the process holds now: the ``<heap>`` entries of glibc's
  ``malloc_info(3)``. One (the main arena) until threads other than the main one allocate;
  XLA:CPU's thread pool adds one per worker as the backend starts (16 after one computation on
  2 cores). JAX has no public query for "has a backend started" (only ``jax._src``), and this is
  the condition that matters anyway: once threads hold arenas of their own, a one-arena limit
  no longer gathers them."""
  libc.open_memstream.restype = ctypes.c_void_p
  libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
  libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
  libc.fclose.argtypes = libc.free.argtypes = [ctypes.c_void_p]
  buf, size = ctypes.c_void_p(), ctypes.c_size_t()
  stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
  if not stream:
    return 1   # cannot tell: assume nothing has attached yet
  libc.malloc_info(0, stream)
  libc.fclose(stream)   # flushes: buf / size now hold the XML
  text = ctypes.string_at(buf, size.value).decode("ascii", "replace")
  libc.free(buf)
  return text.count("<heap nr=")


# Device files an accelerator runtime opens: TPU v2-v4 chips, TPU v5e and later (VFIO),
# NVIDIA and AMD GPUs. A plugin installed on a host without any of them falls back to the CPU.
ACCELERATOR_DEVICE_PATTERNS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def accelerator_devices() -> list[str]:
  """The accelerator device files present on this host (``ACCELERATOR_DEVICE_PATTERNS``)."""
  return sorted(path for pattern in ACCELERATOR_DEVICE_PATTERNS for path in glob.glob(pattern))


def accelerator_plugin_installed() -> bool:
  """Whether a JAX accelerator plugin (an entry point, a ``jax_plugins`` package, ``libtpu``)
  is installed, found without importing it."""
  return (bool(importlib.metadata.entry_points(group="jax_plugins"))
          or importlib.util.find_spec("jax_plugins") is not None
          or importlib.util.find_spec("libtpu") is not None)


def cpu_only() -> bool:
  """Whether JAX will run on the CPU backend, decided without starting a backend: the
  ``jax_platforms`` setting if given; else no accelerator plugin installed, or one installed
  (``libtpu`` for compile-only TPU checks, say) on a host with no accelerator device file."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not accelerator_plugin_installed() or not accelerator_devices()


def configure(mode: str = "system") -> bool:
  """Applies ``mode`` (``train.host_malloc``) to this process's glibc malloc; returns whether
  it changed anything.

  ``reuse``: one arena, large blocks from the heap, freed memory kept (the process's resident
  size stays at its peak). ``system``: glibc's defaults. ``auto``: ``reuse`` when JAX will run
  on CPU only, ``system`` otherwise.
  """
  if mode not in MODES:
    raise ValueError(f"train.host_malloc={mode!r} is unknown; allowed: {', '.join(MODES)}")
  if mode == "system" or (mode == "auto" and not cpu_only()):
    return False
  libc = _glibc()
  if libc is None:
    logging.info("host_malloc=%s: not glibc on Linux; leaving malloc as it is", mode)
    return False
  if arenas(libc) > 1:
    logging.warning("host_malloc=%s: threads already hold malloc arenas of their own (JAX's backend "
                    "is running?); set it before the first JAX computation. Leaving malloc as it is.",
                    mode)
    return False
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))
  if not ok:
    logging.warning("host_malloc=%s: mallopt refused a setting; malloc may be partly tuned", mode)
  else:
    logging.info("host_malloc=%s: one malloc arena, large blocks from the heap, no trimming", mode)
  return ok
