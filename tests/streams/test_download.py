import calendar
import logging
import os
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture
def unpacked(tmp_path, monkeypatch):
    """The folder zips are unpacked into (OCL_EXTRACT_DIR), not the user's cache."""
    monkeypatch.setenv("OCL_EXTRACT_DIR", str(tmp_path / "unpacked"))
    return tmp_path / "unpacked"


def test_extract_zip_once_and_reuse(tmp_path, unpacked, monkeypatch, caplog):
    z = _zip(tmp_path / "d.zip", {"train/a/1.txt": b"hello", "top.txt": b"x"})
    with caplog.at_level(logging.INFO, logger="ocl.streams.download"):
        out = extract_zip(z)
    assert out == str(unpacked / "d")
    assert sorted(os.listdir(tmp_path)) == ["d.zip", "unpacked"]  # nothing beside the user's zip
    assert (unpacked / "d" / "train" / "a" / "1.txt").read_bytes() == b"hello"
    # one notice: where, and how large
    assert f"unpacking {z} (2 files, 0 MB) into {out}, once" in caplog.text
    # archive timestamps are kept, so fingerprints survive re-extraction
    mtime = os.stat(os.path.join(out, "top.txt")).st_mtime
    assert mtime == calendar.timegm((2020, 5, 17, 12, 30, 0, 0, 0, 0))
    # second call reuses: extraction must not run again, also when the zip is named by another path
    monkeypatch.setattr(download, "_extract_into", lambda *a: pytest.fail("re-extracted"))
    assert extract_zip(z) == out
    os.symlink(tmp_path, tmp_path / "link")
    assert extract_zip(str(tmp_path / "link" / "d.zip")) == out


def test_extract_zip_reuses_an_extraction_beside_the_zip(tmp_path, unpacked, monkeypatch):
    """Made by earlier versions: still used, nothing unpacked again."""
    z = _zip(tmp_path / "d.zip", {"f.txt": b"x"})
    legacy = tmp_path / ".d-extracted"
    legacy.mkdir()
    (legacy / ".ocl-extracted").write_text(download._stamp(z))
    monkeypatch.setattr(download, "_extract_into", lambda *a: pytest.fail("re-extracted"))
    assert extract_zip(z) == str(legacy)


def test_extract_zip_redoes_partial(tmp_path, unpacked):
    z = _zip(tmp_path / "d.zip", {"f.txt": b"full"})
    partial = unpacked / "d"
    partial.mkdir(parents=True)
    (partial / "junk.txt").write_text("left by a crash")  # no marker file
    out = extract_zip(z)
    assert out == str(partial) and sorted(os.listdir(out)) == [".ocl-extracted", "f.txt"]


def test_extract_zip_redoes_when_zip_changes(tmp_path, unpacked):
    z = _zip(tmp_path / "d.zip", {"f.txt": b"old"})
    first = extract_zip(z)
    z = _zip(tmp_path / "d.zip", {"f.txt": b"new, longer"})
    out = extract_zip(z)
    assert out == first and open(os.path.join(out, "f.txt"), "rb").read() == b"new, longer"


def test_two_zips_of_one_name_do_not_share_a_folder(tmp_path, unpacked):
    a = _zip((tmp_path / "a").mkdir() or tmp_path / "a" / "d.zip", {"f.txt": b"a"})
    b = _zip((tmp_path / "b").mkdir() or tmp_path / "b" / "d.zip", {"f.txt": b"b"})
    out_a, out_b = extract_zip(a), extract_zip(b)
    assert out_a != out_b and out_b.startswith(str(unpacked / "d-"))
    assert extract_zip(a) == out_a and open(os.path.join(out_a, "f.txt")).read() == "a"


def test_extract_zip_from_a_read_only_folder(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    z = _zip(ro / "d.zip", {"f.txt": b"x"})
    ro.chmod(0o555)
    monkeypatch.delenv("OCL_EXTRACT_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        out = extract_zip(z)
    finally:
        ro.chmod(0o755)
    assert out == str(tmp_path / "home" / ".cache" / "ocl" / "extracted" / "d")
    assert sorted(os.listdir(ro)) == ["d.zip"]
    assert open(os.path.join(out, "f.txt"), "rb").read() == b"x"


def test_extract_zip_without_room(tmp_path, unpacked, monkeypatch):
    z = _zip(tmp_path / "d.zip", {"f.txt": b"x" * 5000})
    monkeypatch.setattr(download, "free_bytes", lambda p: 1000)
    with pytest.raises(OCLError, match=r"unpacking it needs 0 MB in .*unpacked, which has 0 MB free; "
                                       "set OCL_EXTRACT_DIR"):
        extract_zip(z)
    assert not list(unpacked.iterdir())


def test_extract_zip_corrupt(tmp_path, unpacked):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(OCLError, match="bad.zip"):
        extract_zip(str(bad))
    assert not any(p.name.startswith(".bad-partial") for p in tmp_path.iterdir())
    assert not list(unpacked.iterdir())


def test_extract_zip_missing(tmp_path):
    with pytest.raises(OCLError, match="nope.zip"):
        extract_zip(str(tmp_path / "nope.zip"))


def test_extract_zip_runs_started_together_unpack_once(tmp_path, unpacked, monkeypatch, caplog):
    """Runs started at once over a stale extraction: one unpacks, the others wait (and say so)
    and reuse it.

    Without the lock both would delete and replace the same stale folder (one of them failing
    with "No such file or directory" half-way).
    """
    z = _zip(tmp_path / "d.zip", {"a.txt": b"new"})
    (unpacked / "d").mkdir(parents=True)
    (unpacked / "d" / "a.txt").write_bytes(b"stale")  # no marker: partial or stale
    extract_into = download._extract_into
    busy, most, calls = [0], [0], []
    guard = threading.Lock()

    def slow_extract(zip_path, tmp):
        with guard:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
            calls.append(tmp)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        extract_into(zip_path, tmp)
        with guard:
            busy[0] -= 1

    monkeypatch.setattr(download, "_extract_into", slow_extract)
    with caplog.at_level(logging.INFO, logger=download.__name__), ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: extract_zip(z), range(2)))
    assert outs == [str(unpacked / "d")] * 2
    assert most[0] == 1 and len(calls) == 1  # unpacked once, never two at a time
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for another run")]
    assert len(waits) == 1 and str(z) in waits[0]  # the one that waited said why it seemed to hang
    assert (unpacked / "d" / "a.txt").read_bytes() == b"new"
    assert not [p for p in os.listdir(unpacked) if "partial" in p]
