"""Atomic writes (ocl.files)."""

import os

import pytest

from ocl import files


def test_atomic_file_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "f.json"
    files.write_atomic(p, b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(p) as f:
            f.write(b"new, half")
            raise RuntimeError
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives, not mkstemp's private 0600
