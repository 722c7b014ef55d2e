"""Every distribution ships what a wheel user needs: all its packages, py.typed, license, readme, ranges.

``make wheels`` (CI) builds and installs the real wheels; this catches the
same mistakes in a second, without building: a subpackage missing from a
``packages`` list is how the conformance wheel once shipped without its checks.
"""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = [ROOT, *sorted(p.parent for p in ROOT.glob("backends/*/pyproject.toml")), ROOT / "conformance"]


def _project(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())


def _shipped_packages(root: Path, config: dict) -> set[str]:
    setuptools = config.get("tool", {}).get("setuptools", {})
    if "packages" in setuptools and isinstance(setuptools["packages"], list):
        return set(setuptools["packages"])
    include = setuptools["packages"]["find"]["include"]
    prefixes = [pattern.rstrip("*") for pattern in include]
    found = {str(p.parent.relative_to(root)).replace("/", ".") for p in root.rglob("__init__.py")}
    return {name for name in found if any(name.startswith(prefix) for prefix in prefixes)}


@pytest.mark.parametrize("root", DISTRIBUTIONS, ids=lambda p: p.name if p != ROOT else "pagedkv")
def test_a_distribution_ships_every_package_it_has(root):
    config = _project(root)
    shipped = _shipped_packages(root, config)
    top = {name.split(".")[0] for name in shipped}
    on_disk = {str(p.parent.relative_to(root)).replace("/", ".") for t in top for p in (root / t).rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= shipped, f"packages missing from {root.name}/pyproject.toml: {sorted(on_disk - shipped)}"
    for name in top:
        assert (root / name / "py.typed").is_file(), f"{name} has no py.typed"
        assert "py.typed" in config["tool"]["setuptools"]["package-data"][name]


@pytest.mark.parametrize("root", DISTRIBUTIONS, ids=lambda p: p.name if p != ROOT else "pagedkv")
def test_a_distribution_has_complete_metadata(root):
    project = _project(root)["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").is_file() and (root / project["readme"]).is_file()
    assert project["requires-python"] == ">=3.10"
    assert "Typing :: Typed" in project["classifiers"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # SPDX only: no deprecation
    if root != ROOT:
        assert any(d.startswith("pagedkv>=") and "<" in d for d in project["dependencies"]), "unranged pagedkv"
