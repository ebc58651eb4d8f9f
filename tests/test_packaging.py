"""What a regular (non-editable) install ships and what it declares: every package, its data files,
every third-party package it imports."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

import synthdistill

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_package_is_found_by_setuptools():
    found = set(find_packages(SRC))
    folders = {p.parent.relative_to(SRC).as_posix().replace("/", ".") for p in SRC.rglob("*.py")}
    assert {"synthdistill", "synthdistill.cli", "synthdistill.registry"} <= found
    assert folders <= found, f"folders without __init__.py would not be installed: {folders - found}"


def test_public_api_is_reachable_from_the_package():
    assert synthdistill.__version__
    assert callable(synthdistill.load_student) and callable(synthdistill.run_pipeline)
    assert set(synthdistill.__all__) >= {"load_recipe", "load_teacher", "export_student", "write_report"}


def _imported_top_level_modules() -> dict[str, str]:
    """Every third-party module imported anywhere under src/ (lazy imports too) -> one file importing it."""
    found: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("__future__", "synthdistill"):
                    found.setdefault(top, path.relative_to(SRC).as_posix())
    return found


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_distributions() -> set[str]:
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalised(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in requirements}


IMPORT_NAMES = {"PIL": "Pillow", "yaml": "PyYAML", "open_clip": "open_clip_torch", "sklearn": "scikit-learn"}
"""Import names whose distribution is named otherwise (the installed metadata says so too)."""


def test_every_imported_third_party_package_is_declared():
    imported = _imported_top_level_modules()
    assert {"torch", "braceexpand", "fsspec", "PIL", "open_clip"} <= set(
        imported
    )  # the scan sees lazy imports
    providers = importlib.metadata.packages_distributions()
    declared = _declared_distributions()
    missing = {}
    for module, where in imported.items():
        candidates = {_normalised(d) for d in providers.get(module, [])} | {
            _normalised(IMPORT_NAMES.get(module, module))
        }
        if not candidates & declared:
            missing[module] = where
    assert missing == {}, f"imported under src/ but not declared in pyproject.toml: {missing}"


def test_the_declared_floors_are_at_least_what_the_code_needs():
    floors = {}
    for requirement in tomllib.loads((SRC.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "dependencies"
    ]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", requirement.strip())
        if match:
            floors[_normalised(match[1])] = tuple(int(p) for p in match[2].split("."))
    assert floors["open-clip-torch"] >= (3, 0)  # 'local-dir:' loading
    assert floors["torch"] >= (2, 6)  # the torch.export-based ONNX exporter with dynamic_shapes
    assert floors["timm"] >= (1, 0, 17)  # open_clip 3.0's own floor
    assert floors["transformers"] >= (4, 56)  # from_pretrained(dtype=)
    for name in ("braceexpand", "fsspec", "allpairspy", "compel"):
        assert name in floors, name
