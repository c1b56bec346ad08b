"""Hostile or odd files and racing runs (issue 27): names that are not UTF-8, decompression
bombs, EXIF-turned photos, HTML in user text of the report, two runs to one --out, a full disk
under torch.save, an --eval folder that copies the training images, a calibrated ONNX model,
and the local Ray's listening addresses. Real files and real processes throughout."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from crackcore.cli import run_main
from crackcore.config import TrainConfig
from crackcore.exceptions import DataError, StudyFilesError, storage_error
from crackcore.images import ImageTooLargeError, MAX_PIXELS, decode_file, open_image, read_rgb

REPO = Path(__file__).resolve().parents[1]
BAD_NAME = b"crack_\xff.jpg"  # latin-1 0xff: not UTF-8


def bomb_png(path: Path, w: int, h: int) -> Path:
    """A valid black 1-bit PNG of w x h px: 48 KB for 20000 x 20000 px (400 Mpx, 1.2 GB as RGB)."""
    body = zlib.compress(bytes((1 + -(-w // 8)) * h), 9)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def real_folder(root: Path, crack_data: Path, per_class: int) -> Path:
    for name in ("Positive", "Negative"):
        (root / name).mkdir(parents=True)
        for f in sorted((crack_data / name).iterdir())[:per_class]:
            shutil.copy(f, root / name / f.name)
    return root


def test_non_utf8_names_and_a_bomb_are_skipped_and_counted(crack_data: Path, tmp_path: Path, capsys) -> None:
    from crackcore.sites import decode_all
    from crackcore.data import prepare_data
    from crackcore.outputs import write_parquet
    from crackcore.predict import collect_inputs
    from crackcore.sources import discover

    root = real_folder(tmp_path / "d", crack_data, 20)
    donor = sorted((root / "Positive").iterdir())[0].read_bytes()
    with open(os.open(bytes(root / "Positive") + b"/" + BAD_NAME, os.O_WRONLY | os.O_CREAT), "wb") as f:
        f.write(donor)  # a real JPEG under a latin-1 name, as a Windows share or an old camera leaves them
    bomb_png(root / "Negative" / "bomb.png", 20000, 20000)
    samples, skipped = discover(root)
    err = capsys.readouterr().err.strip().splitlines()
    assert skipped["skipped_non_utf8_name"] == 1 and len(samples) == 41
    assert len(err) == 1 and "1 file(s)" in err[0] and "crack_\\xff.jpg" in err[0] and "not valid UTF-8" in err[0]
    write_parquet(samples, tmp_path / "listing.parquet")  # Arrow took the listing: no surrogate in it

    # crackcore.fit's data path: listed, hashed, decoded, split, all tables writable
    data = prepare_data(TrainConfig(data=str(root), image_size=32, split_strategy="random"), progress=False)
    err = capsys.readouterr().err
    assert data.source["skipped_non_utf8_name"] == 1 and data.source["skipped_unreadable"] == 1
    assert "bomb.png" in err and "ImageTooLargeError" in err and f"{MAX_PIXELS / 1e6:.1f}-Mpx limit" in err
    assert len(data.samples) == 40 and data.images.shape == (40, 3, 32, 32)
    write_parquet(data.split_table(), tmp_path / "split.parquet")

    # predict's inputs: the same one line instead of "expected 'str' ... found 'str'" per file
    files, labels, problems = collect_inputs([str(root), str(root / "Positive" / os.fsdecode(BAD_NAME))])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(files) == 41 and not problems and len(err) == 1 and "skipped 2 file(s)" in err[0]
    # calibrate's site decode leaves the bomb out with one line
    images, ok = decode_all(root, pd.Series(["Positive/" + f.name for f in sorted((root / "Positive").glob("*.jpg"))[:2]]
                                            + ["Negative/bomb.png"]), 32)
    assert images.shape == (2, 3, 32, 32) and ok.tolist() == [True, True, False]
    assert "bomb.png" in capsys.readouterr().err


def test_one_pixel_limit_on_every_decode_path(tmp_path: Path) -> None:
    from crackcore.neardup import _signature
    from crackcore.sites import image_size_of

    huge = bomb_png(tmp_path / "huge.png", 20000, 20000)  # over twice the limit: PIL's own guard refuses first
    near = bomb_png(tmp_path / "near.png", 10000, 9000)  # 90 Mpx: just over the limit, which PIL only warns about
    assert huge.stat().st_size < 60_000
    for f in (huge, near):
        for read in (open_image, read_rgb, lambda p: read_rgb(p, exif=True), lambda p: decode_file(p, 32),
                     image_size_of):
            with pytest.raises(ImageTooLargeError, match=r"over the 89\.5-Mpx limit"):
                read(f)
        assert _signature(f) is None  # near-duplicate hashing: undecodable, reported by the decode later
    with open_image(bomb_png(tmp_path / "big.png", 9000, 9000)) as im:  # 81 Mpx: under the limit, still read
        assert im.size == (9000, 9000)
    ok = bomb_png(tmp_path / "ok.png", 64, 64)
    # memory: refusing the 400-Mpx file costs nothing (decoded it would be 1.2 GB more); in a fresh
    # process, whose peak so far is its imports and one ordinary image
    code = ("import resource, sys\nfrom pathlib import Path\nfrom crackcore.images import read_rgb\n"
            "read_rgb(Path(sys.argv[2]))\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try: read_rgb(Path(sys.argv[1]))\nexcept ValueError as e: print(type(e).__name__)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code, str(huge), str(ok)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.split()
    assert out[0] == "ImageTooLargeError" and int(out[1]) < 50_000, out  # KB


def exif_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A 300 x 200 JPEG whose top-left quarter is red, stored with an EXIF Orientation tag."""
    a = np.full((200, 300, 3), 40, np.uint8)
    a[:100, :150] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=95, exif=exif)
    return a


def test_predict_reads_photos_upright_training_reads_them_as_stored(tmp_path: Path) -> None:
    from crackcore.sites import image_size_of

    f = tmp_path / "phone.jpg"
    exif_jpeg(f, 6)  # 6: turn 90 degrees clockwise to show it
    tif = tmp_path / "phone.tif"  # Pillow's TIFF reader turns it itself: the same size either way
    with Image.open(f) as im:
        im.save(tif, exif=im.getexif())
    assert image_size_of(tif) == (200, 300) and tuple(read_rgb(tif, exif=True).shape) == (3, 300, 200)
    upright = read_rgb(f, exif=True)
    assert tuple(upright.shape) == (3, 300, 200) and image_size_of(f) == (200, 300)
    with Image.open(f) as im:  # PIL's own reading of the tag is the reference
        ref = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB"))).permute(2, 0, 1)
    assert (upright.int() - ref.int()).abs().float().mean() < 3
    assert upright[0, :150, 100:].float().mean() > 200 and upright[0, :150, :100].float().mean() < 80  # red: top right
    assert tuple(read_rgb(f).shape) == (3, 200, 300)  # training decode: the patch as stored
    assert tuple(decode_file(f, 64, exif=True).shape) == (3, 64, 64)


def test_report_escapes_user_text_and_names_a_wrong_typed_metric(tmp_path: Path, capsys) -> None:
    from tune.report import check_final_metrics, main

    study = tmp_path / "odd"
    study.mkdir()
    root = "/data/site`<script>alert(1)</script>`[x](javascript:alert(2))"
    (study / "study_config.json").write_text("{}")
    (study / "study.json").write_text(json.dumps({"data_source": {"kind": "real", "root": root}}))
    assert main([str(study)]) == 0
    page = (study / "report" / "index.html").read_text()
    assert "<script>alert" not in page and 'href="javascript' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as the text it is
    assert f"``{root}``" in (study / "report" / "report.md").read_text()  # a code span a backtick cannot end

    good = {"test_accuracy": 0.9, "n_test": 10, "external": {"site": {"n": 5, "accuracy": 0.8}}}
    check_final_metrics(good, study / "final_metrics.json")
    for damage, key in (({"test_accuracy": "high"}, "test_accuracy"), ({"n_test": None}, "n_test"),
                        ({"external": {"site": {"n": 5, "accuracy": [0.8]}}}, "external.site.accuracy")):
        with pytest.raises(StudyFilesError, match=rf"final_metrics.json: {key} is .*not a number"):
            check_final_metrics({**good, **damage}, study / "final_metrics.json")
    (study / "final_metrics.json").write_text(json.dumps({**good, "roc_auc": "n/a"}))
    capsys.readouterr()
    assert run_main(main, [str(study)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final_metrics.json: roc_auc is 'n/a'" in err[0], err


def test_two_fits_to_one_new_out_one_wins(crack_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "crackcore.fit", "--data", str(crack_data), "--subset", "40", "--epochs", "1",
           "--image-size", "16", "--batch-size", "8", "--weights", "random", "--no-shift-suite",
           "--split-strategy", "random", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 1], [(rc, err[-800:]) for rc, _, err in results]
    loser = next(err for rc, _, err in results if rc == 1).strip().splitlines()
    assert len(loser) == 1 and "is being written by another run (pid" in loser[0], loser
    metrics = json.loads((out / "final_metrics.json").read_text())  # the winner's run, whole
    assert metrics["epochs"] == 1 and {p.name for p in out.iterdir()} >= {"model.pt", "split.parquet"}
    assert not (out / ".crackcore.lock").exists() and not list(tmp_path.glob(".run.*"))


def test_claim_of_a_folder_is_released_and_not_an_earlier_run(tmp_path: Path) -> None:
    from crackcore.exceptions import ConfigError
    from crackcore.outputs import claim_folder, folder_in_use

    out = tmp_path / "new"
    with claim_folder(out):
        assert out.is_dir() and not folder_in_use(out)  # the lock file alone is no earlier run
        with pytest.raises(ConfigError, match=f"--out {out} is being written by another run"):
            with claim_folder(out):
                pass
    assert not out.exists()  # made here, left empty: gone
    # a killed holder leaves its lock file but no lock: the next run goes on
    code = ("import os, fcntl, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
            "os.kill(os.getpid(), 9)")
    out.mkdir()
    subprocess.run([sys.executable, "-c", code, str(out / ".crackcore.lock")], timeout=60)
    with claim_folder(out):
        pass


def test_full_disk_under_torch_save_is_one_line(tmp_path: Path, capsys) -> None:
    from crackcore.outputs import save_torch

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a 1 MB tmpfs needs root")
    try:
        with pytest.raises(OSError) as caught:
            save_torch({"state_dict": {"w": torch.zeros(600_000)}}, disk / "model.pt")  # 2.4 MB
        assert caught.value.errno == errno.ENOSPC
        line = str(storage_error(caught.value))
        assert line.startswith(f"no space left on the device in {disk} (writing model.pt)"), line
        assert os.listdir(disk) == []  # no temp file left behind
        assert run_main(lambda _: save_torch(torch.zeros(600_000), disk / "model.pt") and 0) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no space left" in err[0] and "model.pt" in err[0], err
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_eval_folder_that_copies_the_training_images_says_so(crack_data: Path, tmp_path: Path) -> None:
    from crackcore.data import prepare_data

    root = real_folder(tmp_path / "train", crack_data, 6)
    copy = shutil.copytree(root, tmp_path / "copy")
    cfg = TrainConfig(data=str(root), external={"copy": str(copy)}, image_size=16, split_strategy="random")
    with pytest.raises(DataError, match=r"byte-identical copies of images in copy, which are never trained on"):
        prepare_data(cfg, progress=False)


def test_onnx_metadata_carries_the_calibration(tmp_path: Path) -> None:
    from crackcore.classifier import onnx_meta, onnx_metadata
    from crackcore.predict import describe_threshold

    meta = {"image_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3, "classes": ["Negative", "Positive"],
            "temperature": 1.3, "threshold": 0.31, "config": {}, "weights": {},
            "calibration": {"site": "/sites/quay", "site_name": "quay", "k": 50, "after": {"f1": 0.8}}}
    props = onnx_metadata(meta, "ab" * 32, "model.pt")
    loaded = onnx_meta("model.onnx", props)
    assert loaded["calibration"] == meta["calibration"]
    assert describe_threshold(loaded) == describe_threshold(meta) == "decision threshold 0.31 (calibrated on quay, k=50)"
    plain = onnx_meta("m.onnx", onnx_metadata({**meta, "calibration": None, "threshold": None}, "", "m"))
    assert describe_threshold(plain) == "decision threshold 0.5 (default)"


def test_the_local_ray_listens_on_loopback_only() -> None:
    # psutil: the copy Ray ships, importable once ray is
    code = ("import os\nimport ray\nimport psutil\nfrom tune.cluster import connect_ray\nconnect_ray(None)\n"
            "pids = [p.pid for p in psutil.Process().children(recursive=True)] + [os.getpid()]\n"
            "for pid in pids:\n"
            "    try: conns = psutil.Process(pid).net_connections('tcp')\n"
            "    except psutil.Error: continue\n"
            "    for c in conns:\n"
            "        if c.status == psutil.CONN_LISTEN: print('LISTEN', c.laddr.ip, c.laddr.port)\n"
            "ray.shutdown()")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    listening = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("LISTEN")]
    assert proc.returncode == 0 and len(listening) >= 3, proc.stderr[-2000:]  # GCS, raylet, workers at least
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening
