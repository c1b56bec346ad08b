"""Fetch the public dataset: `python -m crackcore.download --to DIR [--url URL|FILE] [--sha256 HEX]`.

Downloads (or copies) the archive, verifies its SHA-256, extracts it (.rar as published, or
.zip/.tar), finds the folder holding Positive/ and Negative/ and moves it into place as
DIR/concrete-crack-images with a SOURCE.json. Every step writes to a temp name first, so an
interrupted or failed run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from crackcore.exceptions import DownloadError
from crackcore.hashing import sha256_file

# Özgenel (2019), Mendeley Data V2, doi:10.17632/5y9wdsg2zt.2, CC BY 4.0:
# "Concrete Crack Images for Classification.rar", 241,363,336 bytes.
OFFICIAL_URL = ("https://data.mendeley.com/public-files/datasets/5y9wdsg2zt/files/"
                "8a70d8a5-bce9-4291-bab9-b48cfb3e87c3/file_downloaded")
# The SHA-256 in Mendeley's file metadata for that archive (public-api/datasets/5y9wdsg2zt/files).
# No machine we work on reaches Mendeley, so it is taken from the published metadata, not from
# a download of ours; a mismatch says how to accept a trusted file anyway.
OFFICIAL_SHA256 = "08d7dc505a4f5a0330cee2fa2a1ae4b5b4f98bcffd0549b774caf7959bb1f02f"
FINAL_NAME = "concrete-crack-images"
CITATION = ("Özgenel, Ç.F. (2019), Concrete Crack Images for Classification, Mendeley Data, V2, "
            "doi:10.17632/5y9wdsg2zt.2")
LICENSE = "CC BY 4.0"


def fetch(url: str, dest: Path) -> None:
    """URL or local file -> dest (via dest.part, renamed when complete)."""
    part = dest.with_name(dest.name + ".part")
    local = Path(url[7:] if url.startswith("file://") else url)
    try:
        if "://" not in url or url.startswith("file://"):
            if not local.is_file():
                raise DownloadError(f"{local} does not exist; pass --url with a reachable URL or an archive file")
            shutil.copyfile(local, part)
        else:
            from tqdm.auto import tqdm

            with urllib.request.urlopen(url, timeout=30) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        bar.update(out.write(chunk))
                got = out.tell()
            # http.client ends a dropped connection as a normal end of file: compare with the header
            if total is not None and got != total:
                raise DownloadError(f"download of {url} stopped after {got} of {total} bytes; run the command "
                                    "again (nothing was kept)")
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:  # IncompleteRead too
        raise DownloadError(f"could not download {url} ({exc}); pass --url with a mirror or a local archive "
                            "file") from None
    finally:  # after the rename there is no .part: this only removes what a failure left
        part.unlink(missing_ok=True)


def _safe_target(base: Path, name: str) -> None:
    if os.path.isabs(name) or not (base / name).resolve().is_relative_to(base.resolve()):
        raise DownloadError(f"archive member {name!r} would be written outside the target folder; refusing it")


def extract(archive: Path, into: Path) -> None:
    """Extract by content type (magic bytes), refusing absolute paths and `..` members."""
    import rarfile

    try:
        with open(archive, "rb") as f:
            head = f.read(8)
        if head.startswith(b"Rar!"):
            try:
                with rarfile.RarFile(archive) as rf:
                    for name in rf.namelist():
                        _safe_target(into, name)
                    rf.extractall(into)
            except rarfile.RarCannotExec:
                raise DownloadError("extracting .rar needs the `unrar` (or `unar`/`bsdtar`) tool: install it "
                                    "(apt-get install unrar-free or libarchive-tools), or extract the archive "
                                    "yourself and pass the folder as --data") from None
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _safe_target(into, name)
                zf.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _safe_target(into, member.name)
                    if member.issym() or member.islnk():
                        raise DownloadError(f"archive member {member.name!r} is a link; refusing it")
                tf.extractall(into, filter="data")
        else:
            raise DownloadError(f"{archive.name} is not a .rar, .zip or .tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, rarfile.Error, EOFError, ValueError) as exc:  # CRC, EOF, bad headers
        raise DownloadError(f"the archive is damaged ({type(exc).__name__}: {str(exc)[:120]}); download it again "
                            "or pass --url with another copy (nothing was kept)") from None


def find_dataset_root(base: Path) -> Path:
    for folder in sorted([base, *[p for p in base.rglob("*") if p.is_dir()]], key=lambda p: len(p.parts)):
        if (folder / "Positive").is_dir() and (folder / "Negative").is_dir():
            return folder
    raise DownloadError("the archive holds no folder with both Positive/ and Negative/; is it the crack dataset?")


def download(to: Path, url: str = OFFICIAL_URL, sha256: str | None = None, force: bool = False) -> Path:
    final = to / FINAL_NAME
    if (final / "SOURCE.json").is_file() and not force:
        return final
    if final.exists() and not force:
        raise DownloadError(f"{final} exists but was not made by this command (no SOURCE.json); use it as --data, "
                            "or pass --force to replace it")
    to.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=to, prefix=".download-"))
    try:
        archive = work / "archive"
        fetch(url, archive)
        digest = sha256_file(archive)
        expected = (sha256 or (OFFICIAL_SHA256 if url == OFFICIAL_URL else None) or "").lower() or None
        if expected and digest != expected:
            raise DownloadError(f"SHA-256 mismatch for {url}: expected {expected}, got {digest}; the file is corrupt, "
                                "not the dataset, or changed at the source (nothing was kept): download it again, or "
                                f"if you trust this file pass --sha256 {digest}")
        if not expected and digest == OFFICIAL_SHA256:  # a local copy or mirror of the official archive
            expected = digest
            print("the archive is the official one (its SHA-256 matches Mendeley's)", file=sys.stderr)
        if not expected:
            print(f"SHA-256 of the archive: {digest} (not verified: pass --sha256 {digest} to pin it)", file=sys.stderr)
        extracted = work / "extracted"
        extracted.mkdir()
        extract(archive, extracted)
        root = find_dataset_root(extracted)
        (root / "SOURCE.json").write_text(json.dumps({
            "url": url, "sha256": digest, "verified": bool(expected), "bytes": archive.stat().st_size,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "citation": CITATION,
            "license": LICENSE}, indent=2))
        if final.exists():  # --force: replace only once the new copy is complete
            shutil.rmtree(final)
        os.replace(root, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crackcore.download",
                                description="Download the Concrete Crack Images for Classification dataset.")
    p.add_argument("--to", type=Path, required=True, help="folder to put concrete-crack-images/ in")
    p.add_argument("--url", default=OFFICIAL_URL, help="mirror URL or local archive file (.rar/.zip/.tar)")
    p.add_argument("--sha256", help="expected SHA-256 of the archive")
    p.add_argument("--force", action="store_true", help="download again even if present")
    a = p.parse_args(argv)
    print(download(a.to, a.url, a.sha256, a.force))
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
