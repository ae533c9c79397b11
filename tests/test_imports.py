"""The package's import structure: library modules never import an entry point, and the
import graph (function-local imports included) has no cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "parcel_jax")
# Thin command lines over the library: nothing inside the package imports them.
ENTRY_POINTS = {"parcel_jax.train", "parcel_jax.evaluate", "parcel_jax.predict", "parcel_jax.compile",
                "parcel_jax.export", "parcel_jax.compare_policies"}


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__")] = os.path.join(root, name)
  return out


def _imports(path: str, modules) -> set[str]:
  """parcel_jax modules ``path`` imports anywhere (top level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
  return {m for m in found if m in modules}


def _graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_module_imports_an_entry_point():
  bad = {m: sorted(deps & ENTRY_POINTS) for m, deps in _graph().items() if deps & ENTRY_POINTS}
  assert not bad, f"modules importing command-line entry points: {bad}"


def test_import_graph_has_no_cycle():
  graph = _graph()
  # A package's __init__ importing its own submodules is not a cycle of the design.
  graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
           for m, deps in graph.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_every_module_imports_alone():
  """Each module in a fresh interpreter (one process for all: ``importlib`` after clearing the
  package from ``sys.modules`` between them)."""
  code = ("import importlib, sys\n"
          f"mods = {sorted(_modules())!r}\n"
          "for m in mods:\n"
          "  for k in [k for k in sys.modules if k == 'parcel_jax' or k.startswith('parcel_jax.')]:\n"
          "    del sys.modules[k]\n"
          "  importlib.import_module(m)\n"
          "print('imported', len(mods))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"imported {len(_modules())}" in proc.stdout
