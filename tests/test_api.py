"""``import ocl``: the public API from the top, imported lazily."""

import subprocess
import sys

import pytest

import ocl
from ocl.compare import run_compare
from ocl.learners.base import Learner
from ocl.run import run_experiment
from ocl.runner import run_stream
from ocl.streams.protocols import Stream


def test_the_api_is_importable_from_the_top():
    assert (ocl.run_stream, ocl.Learner, ocl.Stream, ocl.run_experiment, ocl.run_compare) == (
        run_stream, Learner, Stream, run_experiment, run_compare)
    for name in ocl.__all__:
        assert getattr(ocl, name) is not None and name in dir(ocl)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        ocl.nothing  # noqa: B018


def test_import_ocl_stays_light():
    """The CLI imports ocl before hydra parses the arguments: torch must wait until it is needed."""
    out = subprocess.run([sys.executable, "-c", "import sys, ocl; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
