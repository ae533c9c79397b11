"""pyproject.toml: its dependencies mirror the checked requirement files, it installs parcel_jax
(every subpackage) and nothing else, and no script reaches the package through sys.path edits."""

import ast
import glob
import os
import re
import tomllib

import setuptools

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name: str) -> set[str]:
  lines = open(os.path.join(REPO, name)).read().splitlines()
  return {re.sub(r"\s+", "", l) for l in (l.split("#")[0] for l in lines) if l.strip()}


def _project():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_dependencies_mirror_the_requirement_files():
  project = _project()["project"]
  assert set(project["dependencies"]) == _requirements("requirements.txt")
  assert set(project["optional-dependencies"]["test"]) == _requirements("requirements-test.txt")


def test_discovery_installs_the_package_only():
  find = _project()["tool"]["setuptools"]["packages"]["find"]
  found = set(setuptools.find_packages(REPO, include=find["include"], exclude=find.get("exclude", ())))
  on_disk = {os.path.relpath(os.path.dirname(p), REPO).replace(os.sep, ".")
             for p in glob.glob(os.path.join(REPO, "parcel_jax", "**", "__init__.py"), recursive=True)}
  assert found == on_disk and "parcel_jax.models" in found, (found, on_disk)
  assert not {p for p in found if not p.startswith("parcel_jax")}


def test_scripts_do_not_edit_sys_path():
  for path in glob.glob(os.path.join(REPO, "benchmarks", "*.py")) + glob.glob(
      os.path.join(REPO, "launch", "*.py")) + glob.glob(os.path.join(REPO, "analysis", "*.py")):
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
        raise AssertionError(f"{os.path.relpath(path, REPO)}:{node.lineno} uses sys.path")
