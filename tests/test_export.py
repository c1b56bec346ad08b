"""ONNX for the field: a model.pt trained here, exported with crackcore.export, scores real
images like PyTorch does (logits within 1e-4), carries its input contract in its metadata, takes
any batch size, and crackcore.predict gives the same patches, tiles and heat maps from either
file. Bad input (a foreign or damaged .onnx, metadata that disagrees with the graph, a folder,
a failed parity check) is one line and keeps what was written. Speed is never asserted here."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image

from crackcore import export as export_mod
from crackcore.classifier import ONNX_FORMAT, OnnxClassifier, load_classifier
from crackcore.cli import run_main
from crackcore.config import TrainConfig
from crackcore.data import prepare_data
from crackcore.hashing import sha256_file
from crackcore.images import decode_file
from crackcore.outputs import write_run_outputs
from crackcore.predict import main as predict_main
from crackcore.train import fit

SIZE = 32


@pytest.fixture(scope="module")
def exported(crack_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = TrainConfig(data=str(crack_data), image_size=SIZE, subset=40, epochs=1, lr=0.05, batch_size=32,
                      weights="random", augment_policy="flip")
    data = prepare_data(cfg)
    out = tmp_path_factory.mktemp("run")
    write_run_outputs(out, fit(cfg, data, evaluate_test=True, log=None), data, cfg)
    return {"pt": out / "model.pt", "onnx": out / "model.onnx", "root": Path(data.source["root"])}


@pytest.fixture(scope="module")
def export_output(exported: dict) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert export_mod.main(["--model", str(exported["pt"]), "--out", str(exported["onnx"])]) == 0
    return buf.getvalue()


def real_images(root: Path, per_class: int) -> list[Path]:
    return [f for c in ("Negative", "Positive") for f in sorted((root / c).iterdir())[:per_class]]


def test_export_parity_metadata_and_dynamic_batch(exported: dict, export_output: str) -> None:
    print(export_output)
    # this 1-epoch model's BatchNorm statistics are far from settled: logits in the hundreds, so the
    # float32 rounding of both runtimes is too (the export allows 1e-4 x the largest |logit|)
    m = re.search(r"parity on (\d+) test-split images .*max \|Δ logit\| (\S+) \(logits up to (\S+)\)", export_output)
    assert m and int(m.group(1)) >= 8 and float(m.group(2)) <= 1e-4 * max(1.0, float(m.group(3))), export_output
    payload = torch.load(exported["pt"], weights_only=True)
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"]), load_external_data=False).metadata_props}
    assert props["format"] == ONNX_FORMAT and int(props["image_size"]) == SIZE
    assert json.loads(props["mean"]) == pytest.approx(payload["mean"]) and json.loads(props["std"]) == pytest.approx(payload["std"])
    assert json.loads(props["classes"]) == ["Negative", "Positive"]
    assert float(props["temperature"]) == pytest.approx(payload["temperature"])
    assert float(props["threshold"]) == payload.get("threshold", 0.5)
    assert props["source_sha256"] == sha256_file(exported["pt"])
    assert json.loads(props["config"]) == json.loads(json.dumps(payload["config"], default=str))
    # the graph alone, as a field app sees it: uint8 in, any batch size, same logits as PyTorch
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, SIZE, SIZE]
    reference = load_classifier(exported["pt"], torch.device("cpu"))
    batch = torch.stack([decode_file(f, SIZE) for f in real_images(exported["root"], 3)])
    for b in (1, 5):
        logits, prob = session.run(["logits", "prob_crack"], {"image": batch[:b].numpy()})
        want_logits, want_prob = reference.run(batch[:b])
        assert logits.shape == (b, 2) and prob.shape == (b,)
        assert np.abs(logits - want_logits).max() <= 1e-4 * max(1.0, np.abs(want_logits).max())
        assert np.abs(prob - want_prob).max() <= 1e-5


def test_predict_on_onnx_matches_model_pt(exported: dict, export_output: str, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    files = real_images(exported["root"], 8)
    for f in files:
        (inputs / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, inputs / f.parent.name / f.name)
    photo = Image.new("RGB", (3 * 227, 2 * 227))  # a small "photo": tiled, not a patch
    for i, f in enumerate(files[2:8]):
        photo.paste(Image.open(f).convert("RGB").resize((227, 227)), ((i % 3) * 227, (i // 3) * 227))
    photo.save(tmp_path / "wall.png")
    outs = {}
    for kind in ("pt", "onnx"):
        outs[kind] = tmp_path / f"out-{kind}"
        assert predict_main(["--model", str(exported[kind]), str(inputs), str(tmp_path / "wall.png"),
                             "--out", str(outs[kind]), "--stride", "150"]) == 0
    for suffix, key in (("", "path"), ("_tiles", ["x", "y"])):
        a, b = (pd.read_parquet(f"{outs[k]}{suffix}.parquet").set_index(key) for k in ("pt", "onnx"))
        assert len(a) == len(b) and len(a) > 6 and (a.index == b.index).all()
        assert np.abs(a["prob_crack"] - b["prob_crack"]).max() <= 1e-4
        if suffix == "":
            assert (a["pred_label"] == b["pred_label"]).all()
    pt_photos, onnx_photos = (pd.read_parquet(f"{outs[k]}_photos.parquet") for k in ("pt", "onnx"))
    assert (pt_photos["crack_tiles"] == onnx_photos["crack_tiles"]).all()
    assert (tmp_path / "out-onnx_heatmaps" / "wall_heatmap.png").is_file()
    for kind in ("pt", "onnx"):  # the shift suite too (it gave torch onnxruntime's device name)
        assert predict_main(["--model", str(exported[kind]), str(inputs), "--out", str(tmp_path / f"shift-{kind}"),
                             "--shifts", "jpeg"]) == 0
    a, b = (pd.read_parquet(tmp_path / f"shift-{k}_shifts.parquet") for k in ("pt", "onnx"))
    assert len(a) == 4 and (a["n"] == len(files)).all() and (a["accuracy"] == b["accuracy"]).all()


def one_line_error(main, args: list[str], capsys) -> str:
    """The one stderr line of a failed command (what it printed to stdout after it)."""
    capsys.readouterr()
    assert run_main(main, args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    return err[0] + "\n" + captured.out


def test_bad_onnx_inputs_are_one_line(exported: dict, export_output: str, tmp_path: Path, capsys) -> None:
    img = real_images(exported["root"], 1)[0]
    # an ONNX model that is not ours: runs, but says nothing of its input contract
    node = onnx.helper.make_node("Identity", ["image"], ["logits"])
    graph = onnx.helper.make_graph([node], "foreign", [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                                   [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), tmp_path / "foreign.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all" * 10)
    # ours, but its metadata's image size disagrees with the graph's input (re-exported elsewhere, edited)
    resized = onnx.load(str(exported["onnx"]))
    for p in resized.metadata_props:
        if p.key == "image_size":
            p.value = "48"
    onnx.save(resized, tmp_path / "resized.onnx")
    cases = [(tmp_path / "foreign.onnx", f"is not a crackcore ONNX model (no '{ONNX_FORMAT}' format tag"),
             (tmp_path / "garbage.onnx", "onnxruntime cannot load it: Protobuf parsing failed"),
             (tmp_path / "resized.onnx", f"was exported for input [3, {SIZE}, {SIZE}] but its metadata says 48 px"),
             (exported["onnx"].parent, f"is a folder; pass the model file in it, e.g. {exported['pt'].parent / 'model.onnx'} "
                                       f"or {exported['pt']}")]
    for model, message in cases:
        err = one_line_error(predict_main, ["--model", str(model), str(img), "--out", str(tmp_path / "x")], capsys)
        assert message in err, err
    assert not list(tmp_path.glob("x*"))
    # a batch at another size than the model's is refused by either runtime, not silently resized
    for clf in (load_classifier(exported["onnx"]), load_classifier(exported["pt"])):
        with pytest.raises(Exception, match=f"takes uint8 \\[batch, 3, {SIZE}, {SIZE}\\]"):
            clf.prob_crack(torch.zeros(1, 3, SIZE + 8, SIZE + 8, dtype=torch.uint8))
    for args, message in ((["--model", str(exported["onnx"])], "is an ONNX model already"),
                          (["--model", str(exported["pt"]), "--out", str(tmp_path / "m.txt")], "must end in .onnx"),
                          (["--model", str(exported["pt"]), "--out", str(tmp_path)], "is a folder"),
                          (["--model", str(exported["pt"].parent)], "is a folder; pass the model file in it"),
                          (["--model", str(exported["pt"]), "--out", str(tmp_path / "m.onnx"), "--check-images",
                            str(tmp_path / "nothing")], "is not a folder")):
        assert message in one_line_error(export_mod.main, args, capsys)


def test_failed_parity_keeps_the_earlier_file(exported: dict, export_output: str, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    blob = exported["onnx"].read_bytes()  # the graph already exported: no second export in this test
    monkeypatch.setattr(export_mod, "to_onnx", lambda *a, **k: blob)
    out = tmp_path / "field.onnx"
    out.write_bytes(b"an earlier export")
    checks = tmp_path / "checks"
    checks.mkdir()
    for f in real_images(exported["root"], 2):
        shutil.copy(f, checks / f.name)
    real_run = OnnxClassifier.run
    monkeypatch.setattr(OnnxClassifier, "run", lambda self, x: (real_run(self, x)[0] + 1.0, real_run(self, x)[1]))
    err = one_line_error(export_mod.main, ["--model", str(exported["pt"]), "--out", str(out), "--check-images", str(checks)],
                         capsys)
    assert re.search(r"differ from PyTorch's by 1\.00e\+00 > \S+ \(--tolerance 0.0001 x max", err), err
    assert "not written (an earlier one is kept)" in err
    assert f"parity on 4 images from {checks}: max |Δ logit| 1.00e+00" in err  # the parity line, on stdout
    assert out.read_bytes() == b"an earlier export"
    monkeypatch.setattr(OnnxClassifier, "run", real_run)
    # no real images to be found: the check still runs, on random pixels, and says so
    lone = tmp_path / "lone"
    lone.mkdir()
    payload = torch.load(exported["pt"], weights_only=True)
    torch.save({**payload, "config": {**payload["config"], "data": str(tmp_path / "gone")}}, lone / "model.pt")
    capsys.readouterr()
    assert export_mod.main(["--model", str(lone / "model.pt"), "--max-images", "3"]) == 0
    printed = capsys.readouterr().out
    assert "parity on 3 RANDOM PIXELS: no real images found" in printed and (lone / "model.onnx").read_bytes() == blob


def test_metadata_round_trip_carries_a_calibrated_threshold(exported: dict) -> None:
    from crackcore.classifier import onnx_meta, onnx_metadata

    payload = torch.load(exported["pt"], weights_only=True)
    props = onnx_metadata({**payload, "threshold": 0.7}, "ab" * 32, "model.pt")
    assert all(isinstance(v, str) for v in props.values())  # metadata_props hold text only
    meta = onnx_meta("model.onnx", props)
    assert meta["threshold"] == 0.7 and meta["temperature"] == payload["temperature"]
    assert meta["image_size"] == SIZE and meta["classes"] == list(payload["classes"]) and meta["source_sha256"] == "ab" * 32
    assert onnx_meta("m.onnx", onnx_metadata({**payload, "threshold": None}, "", "m"))["threshold"] == 0.5
    with pytest.raises(Exception, match="damaged crackcore metadata"):
        onnx_meta("m.onnx", {**props, "image_size": "sixty-four"})
    with pytest.raises(Exception, match="of version 2, this crackcore reads version 1"):
        onnx_meta("m.onnx", {**props, "version": "2"})


def test_bench_inference_reports_both_runtimes(tmp_path: Path, capsys) -> None:
    from crackcore.bench import main as bench_main

    assert bench_main(["--inference", "--quick", "--json-out", str(tmp_path / "b.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "b.json").read_text())
    assert [r["batch_size"] for r in printed["inference"]] == [1, 4]
    for row in printed["inference"]:
        assert row["pytorch_img_s"] > 0 and row["onnxruntime_img_s"] > 0
        ratio = row["onnxruntime_img_s"] / row["pytorch_img_s"]
        assert row["onnxruntime_over_pytorch"] == pytest.approx(ratio, rel=0.05, abs=0.01)  # each figure is rounded
