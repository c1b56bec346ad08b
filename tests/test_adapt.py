"""Site adaptation without labels (crackcore.adapt): each method on real wall images, EM on a
hand-made probability set, the CLI end to end (predict, export-format and calibrate take its
model.pt), and each bad input."""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crackcore.adapt import main as adapt_main
from crackcore import adaptation
from crackcore.adaptation import (SELF_MIN_KEPT, adapt_model, apply_prior_shift, bn_modules, em_prior, entropy,
                                  logit_crack, reestimate_bn, self_train, tent)
from crackcore.calibrate import main as calibrate_main
from crackcore.sites import decode_all
from crackcore.classifier import load_classifier
from crackcore.cli import run_main
from crackcore.images import IMAGENET_MEAN, IMAGENET_STD, CLASSES, decode_file
from crackcore.model import CrackResNet
from crackcore.outputs import MODEL_FORMAT, claim_folder

SIZE = 32


def _site(root: Path, source: Path, per_class: int) -> Path:
    for cls in ("Positive", "Negative"):
        (root / cls).mkdir(parents=True)
        for f in sorted((source / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def site(walls: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 + 24 real masonry windows (labelled layout; adapt never reads the labels)."""
    return _site(tmp_path_factory.mktemp("masonry") / "site", walls["masonry"], 24)


@pytest.fixture(scope="module")
def images(site: Path) -> torch.Tensor:
    return torch.stack([decode_file(p, SIZE) for p in sorted(site.rglob("*.jpg"))])


@pytest.fixture(scope="module")
def model(crack_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pt in the crackcore format, freeze_depth 2, whose BN statistics were estimated on
    real concrete images (so the site's differ from them)."""
    torch.manual_seed(0)
    net = CrackResNet(freeze_depth=2)
    concrete = torch.stack([decode_file(p, SIZE) for p in sorted((crack_data / "Positive").glob("*.jpg"))[:16]
                            + sorted((crack_data / "Negative").glob("*.jpg"))[:16]])
    reestimate_bn(net, concrete, "all")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"format": MODEL_FORMAT, "version": 1, "state_dict": net.state_dict(), "arch": "resnet18",
                "classes": list(CLASSES), "image_size": SIZE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "config": {"freeze_depth": 2}, "weights": {"source": "random"},
                "test_metrics": {"n": 10, "tp": 3, "fn": 2, "fp": 1, "tn": 4}, "temperature": 1.5}, path)
    return path


def _norm(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _net(model: Path) -> CrackResNet:
    net = CrackResNet(freeze_depth=2)
    net.load_state_dict(torch.load(model, weights_only=True)["state_dict"])
    return net.eval()


def test_bn_changes_only_the_chosen_layers(model: Path, images: torch.Tensor) -> None:
    net = _net(model)
    before = copy.deepcopy(net.state_dict())
    changed = reestimate_bn(net, images, "trained")
    assert changed and all(n.startswith(("layer2", "layer3", "layer4")) for n in changed)  # stages 2.. were trained
    after = net.state_dict()
    for name, value in after.items():
        moved = not torch.equal(value, before[name])
        is_stat = name.endswith(("running_mean", "running_var"))
        assert moved == (is_stat and name.rsplit(".", 1)[0] in changed), name
    # the new statistics are the site's own: the first re-estimated layer's mean is its input's over the images
    stats = {}
    hook = net.layer2[0].bn1.register_forward_pre_hook(lambda m, i: stats.setdefault("x", i[0].clone()))
    with torch.no_grad():
        net(_norm(images))
    hook.remove()
    assert torch.allclose(net.layer2[0].bn1.running_mean, stats["x"].mean((0, 2, 3)), atol=1e-4)
    # "all" also moves the frozen stem's statistics; a mix keeps part of the old ones
    net_all = _net(model)
    assert "bn1" in reestimate_bn(net_all, images, "all")
    half = _net(model)
    reestimate_bn(half, images, "trained", mix=0.5)
    name = "layer3.0.bn1.running_mean"
    assert torch.allclose(half.state_dict()[name], (before[name] + after[name]) / 2, atol=1e-5)


def test_tent_lowers_the_entropy_and_trains_only_bn_affine(model: Path, images: torch.Tensor) -> None:
    bn_only, adapted = _net(model), _net(model)
    reestimate_bn(bn_only, images)
    record = tent(adapted, images, epochs=2, lr=1e-2, seed=1)
    assert record["steps"] == 2 and record["entropy_last"] < record["entropy_first"]
    with torch.no_grad():
        assert entropy(adapted(_norm(images))).mean() < entropy(bn_only(_norm(images))).mean()
    a, b = adapted.state_dict(), bn_only.state_dict()
    affine = {f"{n}.{p}" for n, m in adapted.named_modules() if m in bn_modules(adapted, "trained") for p in ("weight", "bias")}
    for name in a:
        if name in affine or name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(a[name], b[name]), name  # convolutions, fc and frozen stages untouched
    assert any(not torch.equal(a[n], b[n]) for n in affine)
    again = _net(model)
    tent(again, images, epochs=2, lr=1e-2, seed=1)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())  # seeded


def test_self_train_trains_layer4_and_fc_on_pseudo_labels(model: Path, images: torch.Tensor) -> None:
    net = _net(model)
    before = copy.deepcopy(net.state_dict())
    record = self_train(net, images, epochs=1, confidence=0.5, seed=0)
    assert record["steps"] >= 1 and record["pseudo_labelled_share"] == 1.0  # every top probability is >= 0.5
    assert record["start_confident"] == len(images) and 0 <= record["start_labels_kept"] <= 1
    assert record["inverted"] == (record["start_labels_kept"] < SELF_MIN_KEPT)
    after = net.state_dict()
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert not torch.equal(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    assert torch.equal(after["layer3.1.conv2.weight"], before["layer3.1.conv2.weight"])
    assert torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])  # frozen stem


def test_em_recovers_a_known_prior() -> None:
    rng = np.random.default_rng(0)
    for prior in (0.2, 0.5, 0.8):
        y = rng.random(4000) < prior
        x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
        # posterior of N(+1,1) vs N(-1,1) under a training prior of 0.4
        p = 1 / (1 + np.exp(-(2 * x + np.log(0.4 / 0.6))))
        estimate, iterations = em_prior(p, 0.4)
        assert abs(estimate - y.mean()) < 0.03 and iterations > 1
        assert abs(p.mean() - y.mean()) > abs(estimate - y.mean())  # better than the mean posterior


def test_the_prior_shift_moves_the_crack_log_odds(model: Path, images: torch.Tensor) -> None:
    net = _net(model)
    z = logit_crack(net, images)
    apply_prior_shift(net, 0.7, temperature=1.5)
    assert np.allclose(logit_crack(net, images) / 1.5, z / 1.5 + 0.7, atol=1e-4)


def test_an_em_prior_that_runs_away_is_not_applied(model: Path, images: torch.Tensor) -> None:
    sane = adapt_model(_net(model), images, "bn", train_prior=0.5)["prior"]
    assert sane["applied"] and not sane["ran_away"] and sane["logit_offset"] != 0.0
    net = _net(model)
    with torch.no_grad():
        net.fc.bias[1] += 50.0  # every image a sure crack: EM's estimate runs to 1
    bn_only = copy.deepcopy(net)
    adapt_model(bn_only, images, "bn", prior=False)
    prior = adapt_model(net, images, "bn", train_prior=0.5)["prior"]
    assert prior["ran_away"] and prior["site_prior"] > 0.98 and not prior["applied"] and prior["logit_offset"] == 0.0
    assert np.array_equal(logit_crack(net, images), logit_crack(bn_only, images))  # BN alone


def test_cli_writes_a_model_predict_and_calibrate_take(model: Path, site: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "adapted"
    assert run_main(adapt_main, ["--model", str(model), "--unlabelled", str(site), "--out", str(out),
                                 "--method", "tent", "--labelled", str(site), "--seed", "2"]) == 0
    record = json.loads((out / "adaptation.json").read_text())
    assert record["method"] == "tent" and record["folder"] == str(site.resolve()) and record["bn_layers"] == "trained"
    assert len(record["images_sha256"]) == 64 and record["prior"]["train_prior"] == 0.5
    # same folder labelled and unlabelled: adapted on one half of the photos, scored on the other
    assert record["n"] + record["labelled"]["n"] == 48 and record["labelled"]["n"] > 0
    assert set(record["labelled"]["metrics"]) == {"before", "after"}
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["adaptation"]["images_sha256"] == record["images_sha256"] and payload["temperature"] == 1.5
    clf = load_classifier(out / "model.pt", torch.device("cpu"))
    assert clf.prob_crack(decode_all(site, pd.Series(["Positive/" + next((site / "Positive").iterdir()).name]), SIZE)[0]).shape == (1,)
    # composes with calibrate: k labels after adapting
    cal = tmp_path / "cal"
    assert calibrate_main(["--model", str(out / "model.pt"), "--labelled", str(site), "--k", "8", "--out", str(cal),
                           "--device", "cpu"]) == 0
    assert torch.load(cal / "model.pt", weights_only=True)["adaptation"]["method"] == "tent"
    # an earlier adaptation in --out is replaced
    assert run_main(adapt_main, ["--model", str(model), "--unlabelled", str(site), "--out", str(out)]) == 0
    assert json.loads((out / "adaptation.json").read_text())["method"] == "bn"


@pytest.mark.parametrize("case, needle", [
    ("no_images", "holds no images"),
    ("photos", "are whole photos, not patches"),
    ("adapted_elsewhere", "already adapted to another site"),
    ("foreign_out", "was not written by crackcore.adapt"),
    ("claimed_out", "is being written by another run"),
    ("inverted", "turned the model against its own start"),
])
def test_bad_input_is_one_line_and_writes_nothing(case: str, needle: str, model: Path, site: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    unlabelled, out, chosen, method = site, tmp_path / "out", model, []
    if case == "inverted":  # what quay walls did to a concrete model (3-15 % kept), made certain: no share is enough
        monkeypatch.setattr(adaptation, "SELF_MIN_KEPT", 1.01)
        monkeypatch.setattr(adaptation, "SELF_CONFIDENCE", 0.5)
        method = ["--method", "self-train", "--epochs", "1"]
    if case == "no_images":
        unlabelled = tmp_path / "empty"
        (unlabelled / "sub").mkdir(parents=True)
        (unlabelled / "sub" / "notes.txt").write_text("no images")
    elif case == "photos":
        unlabelled = tmp_path / "photos"
        unlabelled.mkdir()
        from PIL import Image
        Image.new("RGB", (800, 600), (128, 128, 128)).save(unlabelled / "wall.jpg")
    elif case == "adapted_elsewhere":
        other = tmp_path / "other"
        other.mkdir()
        for f in sorted((site / "Negative").iterdir())[:6]:
            shutil.copy(f, other / f.name)
        first = tmp_path / "first"
        assert run_main(adapt_main, ["--model", str(model), "--unlabelled", str(other), "--out", str(first)]) == 0
        chosen = first / "model.pt"
        capsys.readouterr()
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    with claim_folder(out) if case == "claimed_out" else contextlib.nullcontext():  # another adaptation to --out
        rc = run_main(adapt_main, ["--model", str(chosen), "--unlabelled", str(unlabelled), "--out", str(out), *method])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    if case == "foreign_out":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
