"""Adaptation inside a training run (TrainConfig.adapt_to): the val source is scored adapted every
epoch (what selection sees), the final evaluation reports each held-out source and --eval set
zero-shot and adapted, the adapted score never reads the adapted source's labels, and a source
that is not held out is refused in one line. Real images (crack_data, walls), 32 px, 1 epoch."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crackcore import adaptation
from crackcore.cli import run_main
from crackcore.config import TrainConfig
from crackcore.data import BatchLoader, prepare_data
from crackcore.exceptions import ConfigError
from crackcore.fit import main as fit_main
from crackcore.outputs import adapted_how, summary_lines, write_run_outputs
from crackcore.results import Study
from crackcore.train import adapted_evaluation, fit


@pytest.fixture(scope="module")
def sources(crack_data: Path, walls: dict[str, Path]) -> dict[str, str]:
    return {"concrete": str(crack_data), "masonry": str(walls["masonry"]), "quay": str(walls["quay-wall"])}


def tiny(sources: dict[str, str], **changes: object) -> TrainConfig:
    return TrainConfig(data=sources, group_by="^(.*)__", image_size=32, subset=30, epochs=1, batch_size=16,
                       weights="random", shift_suite=False, device="cpu", num_threads=1, **changes)


def test_val_source_selected_adapted_and_every_set_reported_both_ways(sources: dict[str, str], crack_data: Path,
                                                                       tmp_path: Path) -> None:
    cfg = tiny({k: v for k, v in sources.items() if k != "quay"}, val_source="masonry", adapt_to="masonry",
               external={"quay": sources["quay"]})
    data = prepare_data(cfg)
    result = fit(cfg, data, evaluate_test=True, log=None)
    row = result.history.iloc[-1]
    # selection sees the adapted score; the zero-shot one stays beside it
    assert row["val_acc"] == result.val["accuracy"] == result.adapted["masonry"]["accuracy"]
    assert row["val_acc_zero_shot"] == result.held_out["masonry"]["accuracy"] == result.val_zero_shot["accuracy"]
    assert set(result.adapted) == {"masonry", "quay"} == set(result.adaptation)
    for name, zero_shot in (("masonry", result.held_out["masonry"]), ("quay", result.external["quay"])):
        a, z = result.adapted[name]["predictions"], zero_shot["predictions"]
        assert (a["path"].to_numpy() == z["path"].to_numpy()).all() and len(a) == result.adaptation[name]["n"]
        assert not np.allclose(a["prob_crack"], z["prob_crack"])  # BN statistics and prior moved
        assert result.adaptation[name]["method"] == "bn" and "bn_changed" in result.adaptation[name]
    metrics = write_run_outputs(tmp_path, result, data, cfg)
    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert saved["val_adapted_to"] == "masonry"
    for block in (saved["per_source"]["masonry"], saved["external"]["quay"]):
        assert block["adapted"]["method"] == "bn" and block["adapted"]["n"] == block["n"]
        assert block["adapted"]["ci95_low"] <= block["adapted"]["accuracy"] <= block["adapted"]["ci95_high"]
    assert saved["per_source"]["masonry"]["accuracy"] == result.held_out["masonry"]["accuracy"]  # zero-shot
    assert saved["per_source"]["masonry"]["adapted"]["prior_applied"] is True
    for block in (saved["per_source"]["masonry"], saved["external"]["quay"]):  # paired over the same images
        gain = block["adapted"]["gain"]
        assert gain["difference"] == pytest.approx(block["adapted"]["accuracy"] - block["accuracy"])
        assert gain["ci95_low"] <= gain["difference"] <= gain["ci95_high"] and gain["n"] == block["n"]
    # --no-adapt-prior: BN statistics alone, no shift of the decision
    loader = BatchLoader(data, "val", 256, torch.device("cpu"), shuffle=False, sources=["masonry"])
    bn_only, record = adapted_evaluation(result.model, data, "val", "masonry", loader, cfg.replace(adapt_prior=False))
    assert record["prior"]["applied"] is False and record["prior"]["logit_offset"] == 0.0
    assert not np.allclose(bn_only["predictions"]["logit_crack"], result.val["predictions"]["logit_crack"])
    lines = summary_lines(metrics, tmp_path)
    assert any(line.startswith("masonry, held out, selection only, adapted (bn): accuracy") for line in lines)
    assert adapted_how({"method": "bn", "prior_applied": False}) == "bn, no prior"
    assert any(line.startswith("external quay, adapted (bn)") for line in lines)
    # the study reader gives an adapted set a row of its own
    assert {"masonry (adapted)", "quay (adapted)"} <= set(Study(tmp_path, final_metrics=saved).per_set()["set"])


def test_adapted_score_never_reads_the_adapted_sources_labels(sources: dict[str, str]) -> None:
    cfg = tiny(sources, val_source="masonry", test_source="quay", adapt_to="quay")
    data = prepare_data(cfg)
    quay = (data.samples["source"] == "quay").to_numpy()
    relabelled = data.samples.copy()  # new labels, at another crack share than the real ones
    relabelled.loc[quay, "label"] = (np.random.default_rng(0).random(quay.sum()) < 0.85).astype(int)
    runs = [fit(cfg, d, evaluate_test=True, log=None) for d in (data, dataclasses.replace(data, samples=relabelled))]
    a, b = (r.adapted["quay"]["predictions"] for r in runs)
    assert abs(a["true_label"].mean() - b["true_label"].mean()) > 0.2  # the labels did change ...
    assert np.array_equal(a["prob_crack"].to_numpy(), b["prob_crack"].to_numpy())  # ... the adapted model did not
    assert runs[0].adaptation["quay"]["prior"] == runs[1].adaptation["quay"]["prior"]
    assert runs[0].val["accuracy"] == runs[1].val["accuracy"]  # masonry, trained the same: zero-shot here


def test_adapt_to_a_source_not_held_out_is_one_line(sources: dict[str, str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="adapt_to='concrete' is not a held-out source"):
        tiny(sources, val_source="masonry", adapt_to="concrete").check_sources()
    out = tmp_path / "run"
    rc = run_main(fit_main, ["--data", f"concrete={sources['concrete']}", "--data", f"masonry={sources['masonry']}",
                             "--val-source", "masonry", "--adapt-to", "quay", "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--adapt-to" in err and "held out: masonry" in err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(ConfigError, match="adapt_method='fancy' is unknown"):
        tiny(sources, adapt_method="fancy")


def test_a_self_train_that_turns_on_its_start_is_flagged(sources: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # what the FixMatch form did on quay walls (3-15 % of its confident start kept), made certain
    monkeypatch.setattr(adaptation, "SELF_MIN_KEPT", 1.01)
    cfg = tiny(sources, val_source="masonry", test_source="quay", adapt_to="quay", adapt_method="self-train")
    lines: list[str] = []
    result = fit(cfg, prepare_data(cfg), evaluate_test=True, log=lines.append)
    record = result.adaptation["quay"]["self_train"]
    assert record["inverted"] and 0 <= record["start_labels_kept"] <= 1
    assert any(line.startswith("warning: quay adapted: self-train turned the model against its own start")
               for line in lines), lines
