"""What a regular (non-editable) install ships: every package and its data files."""

from pathlib import Path

from setuptools import find_packages

import synthdistill

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
