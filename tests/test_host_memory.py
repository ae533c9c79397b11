"""host_memory: XLA:CPU's per-execution buffers are reused instead of faulted in afresh."""

import ast
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from parcel_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose temporary buffer is far above glibc's largest mmap threshold (32 MiB): the
# (8192, 2048) float32 product (64 MiB) is materialised between the two matmuls. Prints the
# minor page faults of its fourth execution (the first three warm up).
_PROBE = r"""
import resource, sys
from parcel_jax import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (8192, 8))
w1 = jax.random.normal(jax.random.key(1), (8, 2048))
w2 = jax.random.normal(jax.random.key(2), (2048, 8))
f = jax.jit(lambda x: (jnp.tanh(x @ w1) @ w2).sum())
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_one_execution(mode: str) -> tuple[str, int]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  applied, faults = out.stdout.split()[-2:]
  return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_stops_per_execution_page_faults():
  applied_system, system = _faults_of_one_execution("system")
  applied_reuse, reuse = _faults_of_one_execution("reuse")
  assert (applied_system, applied_reuse) == ("False", "True")
  # glibc's default maps the 64 MiB buffer afresh each execution: >= 16 k pages faulted in.
  assert system >= 8_000, system
  assert reuse * 8 < system, (reuse, system)


_ARENAS = r"""
import ctypes
from parcel_jax import host_memory
libc = ctypes.CDLL(None)
before = host_memory.arenas(libc)
import jax.numpy as jnp
jnp.ones((256, 256)).sum().block_until_ready()
print(before, host_memory.arenas(libc), host_memory.configure("reuse"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_arenas_tell_a_started_backend_without_jax_internals():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _ARENAS], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  before, after, applied = out.stdout.split()[-3:]
  # Importing the package (and JAX) leaves the main arena alone; the CPU client's worker
  # threads each take one; configure() then declines.
  assert (int(before), applied) == (1, "False") and int(after) > 1, out.stdout
  imported = set()
  for node in ast.walk(ast.parse(open(host_memory.__file__).read())):
    if isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.update(f"{node.module}.{a.name}" for a in node.names)
  assert imported and not any("_src" in name for name in imported), imported   # public APIs only


def test_auto_follows_the_platform():
  with _platforms("cpu"):
    assert host_memory.cpu_only()
  with _platforms("cuda,cpu"):
    assert not host_memory.cpu_only()


def test_an_accelerator_plugin_without_its_device_is_cpu_only(monkeypatch, tmp_path):
  # libtpu (installed for compile-only TPU checks) on a CPU host: JAX falls back to the CPU.
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: True)
  monkeypatch.setattr(host_memory, "ACCELERATOR_DEVICE_PATTERNS", (str(tmp_path / "accel[0-9]*"),))
  with _platforms(""):
    assert host_memory.accelerator_devices() == []
    assert host_memory.cpu_only()
    (tmp_path / "accel0").touch()
    assert host_memory.accelerator_devices() == [str(tmp_path / "accel0")]
    assert not host_memory.cpu_only()
    monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: False)
    assert host_memory.cpu_only()   # a device file but no plugin: JAX can only use the CPU


def test_bad_mode_names_the_field_and_late_calls_change_nothing():
  with pytest.raises(ValueError, match="train.host_malloc='mmap'"):
    host_memory.configure("mmap")
  assert host_memory.configure("system") is False
  jnp.zeros(()).block_until_ready()  # the backend is running: too late to retune this process
  assert host_memory.configure("reuse") is False


class _platforms:
  """Sets jax_platforms for a block (the value is read, not used: no backend is restarted)."""

  def __init__(self, value):
    self.value = value

  def __enter__(self):
    self.old = jax.config.jax_platforms
    jax.config.update("jax_platforms", self.value)

  def __exit__(self, *exc):
    jax.config.update("jax_platforms", self.old)
