import calendar
import os
import socket
import zipfile

import pytest

from ocl.errors import OCLError
from ocl.streams import download
from ocl.streams.download import extract_zip, fetch, missing_files, network_available


def test_network_available_local_listener():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert network_available("127.0.0.1", srv.getsockname()[1], timeout=1.0)


def test_network_unavailable_closed_port_and_bad_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    assert not network_available("127.0.0.1", port, timeout=1.0)
    assert not network_available("no-such-host.invalid", timeout=1.0)


def test_missing_files_message():
    err = missing_files("cifar10", ["/data/a/b", "/data/c"], "set stream.root")
    assert isinstance(err, OCLError)
    msg = str(err)
    assert "cifar10" in msg and "/data/a/b" in msg and "/data/c" in msg and "set stream.root" in msg


def test_fetch_refuses_without_download():
    calls = []
    with pytest.raises(OCLError, match="download=False") as e:
        fetch("x", "example.org", lambda: calls.append(1), ["/p/q"], "hint", download=False)
    assert "/p/q" in str(e.value) and not calls


def test_fetch_without_network(monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda *a, **k: False)
    calls = []
    with pytest.raises(OCLError, match="cannot be reached") as e:
        fetch("x", "example.org", lambda: calls.append(1), ["/p/q"], "hint", download=True)
    assert "/p/q" in str(e.value) and "example.org" in str(e.value) and not calls


def test_fetch_failure_becomes_oclerror(monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda *a, **k: True)

    def boom():
        raise RuntimeError("checksum mismatch")

    with pytest.raises(OCLError, match="checksum mismatch") as e:
        fetch("x", "example.org", boom, ["/p/q"], "hint", download=True)
    assert "/p/q" in str(e.value)


def test_fetch_success(monkeypatch):
    monkeypatch.setattr(download, "network_available", lambda *a, **k: True)
    calls = []
    fetch("x", "example.org", lambda: calls.append(1), ["/p/q"], "hint", download=True)
    assert calls == [1]


def _zip(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 5, 17, 12, 30, 0)), data)
    return str(path)


def test_extract_zip_once_and_reuse(tmp_path, monkeypatch):
    z = _zip(tmp_path / "d.zip", {"train/a/1.txt": b"hello", "top.txt": b"x"})
    out = extract_zip(z)
    assert out == str(tmp_path / ".d-extracted")
    assert (tmp_path / ".d-extracted" / "train" / "a" / "1.txt").read_bytes() == b"hello"
    # archive timestamps are kept, so fingerprints survive re-extraction
    mtime = os.stat(os.path.join(out, "top.txt")).st_mtime
    assert mtime == calendar.timegm((2020, 5, 17, 12, 30, 0, 0, 0, 0))
    # second call reuses: extraction must not run again
    monkeypatch.setattr(download, "_extract_into", lambda *a: pytest.fail("re-extracted"))
    assert extract_zip(z) == out


def test_extract_zip_redoes_partial(tmp_path):
    z = _zip(tmp_path / "d.zip", {"f.txt": b"full"})
    partial = tmp_path / ".d-extracted"
    partial.mkdir()
    (partial / "junk.txt").write_text("left by a crash")  # no marker file
    out = extract_zip(z)
    assert sorted(os.listdir(out)) == [".ocl-extracted", "f.txt"]


def test_extract_zip_redoes_when_zip_changes(tmp_path):
    z = _zip(tmp_path / "d.zip", {"f.txt": b"old"})
    extract_zip(z)
    z = _zip(tmp_path / "d.zip", {"f.txt": b"new, longer"})
    out = extract_zip(z)
    assert open(os.path.join(out, "f.txt"), "rb").read() == b"new, longer"


def test_extract_zip_falls_back_to_cache_when_readonly(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    z = _zip(ro / "d.zip", {"f.txt": b"x"})
    ro.chmod(0o555)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        out = extract_zip(z)
    finally:
        ro.chmod(0o755)
    assert out == str(tmp_path / "home" / ".cache" / "ocl" / "extracted" / "d")
    assert not (ro / ".d-extracted").exists()
    assert open(os.path.join(out, "f.txt"), "rb").read() == b"x"


def test_extract_zip_corrupt(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(OCLError, match="bad.zip"):
        extract_zip(str(bad))
    assert not any(p.name.startswith(".bad-partial") for p in tmp_path.iterdir())


def test_extract_zip_missing(tmp_path):
    with pytest.raises(OCLError, match="nope.zip"):
        extract_zip(str(tmp_path / "nope.zip"))
