"""Fixtures of the scripts' tests: a script of ``scripts/`` loaded as a module."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    """``load_script("recovery.py")`` -> that script as a module (its ``main`` not run)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{Path(name).stem}_script", SCRIPTS / name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
