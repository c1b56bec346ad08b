"""The download command against a local HTTP server on 127.0.0.1 serving real images."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from crackcore.cli import run_main
from crackcore.download import FINAL_NAME, main

NESTED = "Concrete Crack Images for Classification"


@pytest.fixture(scope="module")
def served(crack_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A folder served over HTTP with a good zip, a tar.gz, a traversal zip and a zip without classes."""
    site = tmp_path_factory.mktemp("site")
    files = {f"{NESTED}/{c}/{p.name}": p.read_bytes() for c in ("Positive", "Negative")
             for p in sorted((crack_data / c).iterdir())[:5]}
    with zipfile.ZipFile(site / "crack.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with tarfile.open(site / "crack.tar.gz", "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(site / "evil.zip", "w") as zf:
        zf.writestr("../../escaped.jpg", b"x")
    with zipfile.ZipFile(site / "noclasses.zip", "w") as zf:
        zf.writestr("images/a.jpg", next(iter(files.values())))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", site
    server.shutdown()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(served, tmp_path: Path, capsys) -> None:
    url, site = served
    assert run_main(main, ["--to", str(tmp_path), "--url", f"{url}/crack.zip", "--sha256", sha(site / "crack.zip")]) == 0
    final = tmp_path / FINAL_NAME
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(final)
    assert len(list((final / "Positive").iterdir())) == 5 and len(list((final / "Negative").iterdir())) == 5
    assert '"verified": true' in (final / "SOURCE.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == [FINAL_NAME]  # no temp files left


def test_wrong_checksum_keeps_nothing(served, tmp_path: Path, capsys) -> None:
    url, _ = served
    assert run_main(main, ["--to", str(tmp_path), "--url", f"{url}/crack.zip", "--sha256", "0" * 64]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("archive, message", [("evil.zip", "outside the target folder"),
                                              ("noclasses.zip", "no folder with both Positive/ and Negative/")])
def test_bad_archives_are_refused(served, tmp_path: Path, capsys, archive: str, message: str) -> None:
    url, _ = served
    assert run_main(main, ["--to", str(tmp_path / "d"), "--url", f"{url}/{archive}"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d" / FINAL_NAME).exists() and not (tmp_path / "escaped.jpg").exists()


def test_unreachable_url_fails_fast(tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    assert run_main(main, ["--to", str(tmp_path), "--url", f"http://127.0.0.1:{port}/x.zip"]) == 1
    assert "could not download" in capsys.readouterr().err


def test_local_tar_gz_and_idempotence(served, tmp_path: Path, capsys) -> None:
    _, site = served
    local = tmp_path / "copy.tar.gz"
    shutil.copy(site / "crack.tar.gz", local)
    assert run_main(main, ["--to", str(tmp_path / "d"), "--url", str(local)]) == 0
    assert "not verified" in capsys.readouterr().err
    marker = tmp_path / "d" / FINAL_NAME / "SOURCE.json"
    before = marker.stat().st_mtime_ns
    assert run_main(main, ["--to", str(tmp_path / "d"), "--url", str(local)]) == 0
    assert marker.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["truncated-tar", "flipped-zip"])
def test_damaged_archive_is_one_line_error(served, tmp_path: Path, capsys, damage: str) -> None:
    _, site = served
    if damage == "truncated-tar":
        data = (site / "crack.tar.gz").read_bytes()
        data = data[: len(data) // 2]
    else:
        data = bytearray((site / "crack.zip").read_bytes())
        data[60] ^= 0xFF  # inside the first member's compressed bytes: a CRC error on extraction
        data = bytes(data)
    local = tmp_path / "damaged.bin"
    local.write_bytes(data)
    assert run_main(main, ["--to", str(tmp_path / "d"), "--url", str(local)]) == 1
    assert "the archive is damaged" in capsys.readouterr().err
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("reply, message", [
    # promises 100,000 bytes, hangs up after 1,000
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000, "stopped after 1000 of 100000 bytes"),
    # chunked (no length): hangs up inside the second chunk
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n3e8\r\n" + b"x" * 10,
     "could not download"),
], ids=["content-length", "chunked"])
def test_connection_dropped_mid_download_keeps_nothing(tmp_path: Path, capsys, reply: bytes, message: str) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply)

    threading.Thread(target=serve_once, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/crack.zip"
    assert run_main(main, ["--to", str(tmp_path), "--url", url]) == 1
    server.close()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_not_made_by_download_is_kept(served, tmp_path: Path, capsys) -> None:
    url, _ = served
    mine = tmp_path / FINAL_NAME / "Positive" / "my_photo.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    assert run_main(main, ["--to", str(tmp_path), "--url", f"{url}/crack.zip"]) == 1
    assert "pass --force" in capsys.readouterr().err and mine.read_bytes() == b"mine"


def test_the_published_checksum_verifies_the_official_archive_and_its_copies(served, tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    import crackcore.download as dl

    url, site = served
    monkeypatch.setattr(dl, "OFFICIAL_URL", f"{url}/crack.zip")  # stands in for Mendeley
    monkeypatch.setattr(dl, "OFFICIAL_SHA256", "0" * 64)
    assert run_main(main, ["--to", str(tmp_path / "a")]) == 1
    [line] = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error: ")]  # besides progress
    assert "SHA-256 mismatch" in line and line.endswith(f"--sha256 {sha(site / 'crack.zip')}")
    assert not (tmp_path / "a" / FINAL_NAME).exists()
    monkeypatch.setattr(dl, "OFFICIAL_SHA256", sha(site / "crack.zip"))
    assert run_main(main, ["--to", str(tmp_path / "b")]) == 0
    local = tmp_path / "copy.zip"  # a local copy of the official archive is recognised as such
    shutil.copy(site / "crack.zip", local)
    assert run_main(main, ["--to", str(tmp_path / "c"), "--url", str(local)]) == 0
    assert "the archive is the official one" in capsys.readouterr().err
    for d in ("b", "c"):
        assert json.loads((tmp_path / d / FINAL_NAME / "SOURCE.json").read_text())["verified"] is True
