"""Training, evaluation, error analysis and the baseline CLI on real images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crackcore.config import ConfigError, TrainConfig, apply_overrides, load_study_config
from crackcore.data import prepare_data
from crackcore.outputs import errors_from_predictions, write_json, write_parquet
from crackcore.metrics import expected_calibration_error, reliability_table, roc_auc, wilson_interval
from crackcore.train import autocast_dtype, fit, precision_name, training_step

REPO = Path(__file__).resolve().parents[1]
LOSS_ACC = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "current_lr"]


@pytest.fixture(scope="module")
def small_cfg(crack_data: Path) -> TrainConfig:
    return TrainConfig(data=str(crack_data), image_size=32, subset=150, epochs=3, lr=0.01, batch_size=32,
                    weights="random", augment_policy="flip")


def test_fine_tuning_beats_chance_and_is_reproducible(small_cfg: TrainConfig) -> None:
    data = prepare_data(small_cfg)
    a = fit(small_cfg, data, log=None)
    b = fit(small_cfg, data, log=None)
    pd.testing.assert_frame_equal(a.history[LOSS_ACC], b.history[LOSS_ACC])
    assert a.val["accuracy"] >= 0.75, a.history
    preds = a.val["predictions"]
    assert list(preds["sample"]) == list(range(len(data.indices("val"))))
    assert preds["prob_crack"].between(0, 1).all()
    # the rate the epoch's last step used, never the scheduler's next one (0 after the last epoch)
    lrs = a.history["current_lr"]
    assert (lrs > 0).all() and lrs.is_monotonic_decreasing and lrs.iloc[0] < small_cfg.lr


def test_resume_from_epoch_checkpoint_continues_identically(small_cfg: TrainConfig) -> None:
    data = prepare_data(small_cfg)
    states = {}
    full = fit(small_cfg, data, log=None, on_epoch=lambda row, state_fn: states.setdefault(row["epoch"], state_fn()))
    resumed = fit(small_cfg, data, log=None, resume_state=states[1])
    pd.testing.assert_frame_equal(full.history[LOSS_ACC], resumed.history[LOSS_ACC])


def test_a_frozen_checkpoint_holds_the_head_alone_and_resumes_exactly(small_cfg: TrainConfig, tmp_path: Path) -> None:
    from crackcore import checkpoint
    from crackcore.exceptions import CheckpointError

    data = prepare_data(small_cfg)
    sizes, states = {}, {}
    for depth in (0, 3, 5):
        cfg = small_cfg.replace(freeze_depth=depth, epochs=2)
        full = fit(cfg, data, log=None, on_epoch=lambda row, state_fn, d=depth: states.setdefault(d, state_fn()))
        (tmp_path / str(depth)).mkdir()
        sizes[depth] = checkpoint.save(states[depth], tmp_path / str(depth))
        if depth:  # frozen stages come back from the seeded init, not from the file
            resumed = fit(cfg, data, log=None, resume_state=checkpoint.load(tmp_path / str(depth)))
            pd.testing.assert_frame_equal(full.history[LOSS_ACC], resumed.history[LOSS_ACC])
    assert sizes[5] <= 0.05 * sizes[0] and sizes[3] < sizes[0], sizes
    with pytest.raises(CheckpointError, match="written with freeze_depth 3, this run freezes 2"):
        fit(small_cfg.replace(freeze_depth=2, epochs=2), data, log=None, resume_state=states[3])
    foreign = {**states[3], "model": {**states[3]["model"], "extra.weight": torch.zeros(1)}}
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fit(small_cfg.replace(freeze_depth=3, epochs=2), data, log=None, resume_state=foreign)


def test_a_last_batch_of_one_image_is_dropped_not_fed_to_batchnorm(small_cfg: TrainConfig) -> None:
    # at 32 px layer4 is 1x1: BatchNorm in train mode cannot normalise a single image
    data = prepare_data(small_cfg)
    n_train = len(data.indices("train"))
    result = fit(small_cfg.replace(batch_size=n_train - 1, epochs=1), data, log=None)
    assert result.history["train_loss"].notna().all()


def test_amp_off_trains_in_float32_and_says_so(small_cfg: TrainConfig) -> None:
    data = prepare_data(small_cfg)
    result = fit(small_cfg.replace(amp=False, epochs=1), data, log=None)
    assert result.precision == "float32" and result.val["accuracy"] > 0


def test_float16_steps_go_through_the_grad_scaler() -> None:
    # fp16 (GPUs without bf16) needs loss scaling; the step must unscale before updating, so the
    # update equals the float32 one rather than init_scale times it
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    models = [torch.nn.Linear(8, 2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].weight.detach().clone()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    logits, loss = training_step(models[0], opts[0], x, y, torch.nn.CrossEntropyLoss(), torch.float16, scaler)
    training_step(models[1], opts[1], x, y, torch.nn.CrossEntropyLoss(), None, None)
    assert logits.dtype == torch.float16 and torch.isfinite(loss)
    step_fp16, step_fp32 = models[0].weight - start, models[1].weight - start
    assert step_fp32.abs().max() > 1e-3
    assert torch.allclose(step_fp16, step_fp32, rtol=0.02, atol=1e-4)


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_gpu_precision_is_bf16_only_where_native(monkeypatch, major: int, expected: torch.dtype) -> None:
    # a T4/V100 (sm7x) can run bf16 kernels by emulation, slowly: those get fp16 + GradScaler
    import contextlib
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulation works
    assert autocast_dtype(torch.device("cuda")) == expected


def test_errors_hold_exactly_the_misclassified_rows() -> None:
    preds = pd.DataFrame({"sample": range(6), "path": [f"p{i}" for i in range(6)], "true_label": [0, 1, 1, 0, 1, 0],
                          "pred_label": [0, 0, 1, 1, 1, 0], "prob_crack": [0.1, 0.2, 0.9, 0.95, 0.6, 0.3]})
    errors = errors_from_predictions(preds)
    assert list(errors["sample"]) == [3, 1]  # most confident mistake first
    assert list(errors.columns) == ["sample", "path", "true_label", "pred_label", "prob_crack"]


def test_atomic_writers_keep_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_json({"a": 1}, target)
    table = tmp_path / "m.parquet"
    write_parquet(pd.DataFrame({"x": [1, 2]}), table)
    with pytest.raises(Exception):  # a column pyarrow cannot store: the write fails midway
        write_parquet(pd.DataFrame({"x": [object(), object()]}), table)
    assert list(pd.read_parquet(table)["x"]) == [1, 2]
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.parquet"]  # no temp files left


def test_written_files_and_folders_get_ordinary_permissions(tmp_path: Path) -> None:
    # the temp file/folder behind each atomic write is private (0600/0700); the result must not be
    import os
    import stat

    from crackcore.outputs import build_folder

    umask = os.umask(0o022)
    os.umask(umask)
    write_json({"a": 1}, tmp_path / "m.json")
    folder = build_folder(tmp_path / "gen", "DONE.json", {"v": 1}, "test folder", lambda d: (d / "x").write_text("x"))
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_baseline_cli_writes_consistent_outputs(crack_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "baseline"
    proc = subprocess.run([sys.executable, "-m", "crackcore.fit", "--data", str(crack_data), "--subset", "40",
                           "--epochs", "1", "--image-size", "32", "--weights", "random", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("final_history.parquet", "final_metrics.json", "errors.parquet", "predictions.parquet",
                 "split.parquet", "model.pt", "config.json"):
        assert (out / name).exists(), name
    preds = pd.read_parquet(out / "predictions.parquet")
    errors = pd.read_parquet(out / "errors.parquet")
    assert list(errors.columns) == ["sample", "path", "true_label", "pred_label", "prob_crack", "source"]
    wrong = preds[preds["true_label"] != preds["pred_label"]]
    assert sorted(errors["sample"]) == sorted(wrong["sample"])
    m = json.loads((out / "final_metrics.json").read_text())
    assert m["n_test"] == len(preds) and m["errors"] == len(errors)
    assert m["test_accuracy"] == pytest.approx((preds["true_label"] == preds["pred_label"]).mean())
    tp = ((preds["pred_label"] == 1) & (preds["true_label"] == 1)).sum()
    assert m["recall"] == pytest.approx(tp / (preds["true_label"] == 1).sum())
    assert m["ci95_low"] <= m["test_accuracy"] <= m["ci95_high"]
    assert m["weights"]["source"] == "random"
    assert m["train_precision"] == precision_name(autocast_dtype(torch.device("cpu")))
    assert "95 % CI" in proc.stdout and "misclassified test images" in proc.stdout
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["image_size"] == 32 and model["config"]["subset"] == 40


def test_metrics_against_hand_computed_values() -> None:
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.40383, 0.59617), abs=1e-4)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # a tie counts one half
    # ECE by hand: predicted-class confidences 0.9 x4 (3 right) and 0.6 x2 (1 right)
    y = [1, 1, 1, 0, 0, 1]
    p = [0.9, 0.9, 0.9, 0.9, 0.4, 0.4]  # last two predict 0 with confidence 0.6
    table = reliability_table(y, p)
    assert table["n"].sum() == 6
    assert expected_calibration_error(y, p) == pytest.approx(4 / 6 * abs(0.75 - 0.9) + 2 / 6 * abs(0.5 - 0.6))


def test_config_files_and_bad_values() -> None:
    cfg = load_study_config(REPO / "experiments" / "study.toml")
    assert cfg.num_samples == 32 and cfg.train.image_size == 227
    assert apply_overrides(cfg, cfg.cpu).train.image_size == 64
    with pytest.raises(ConfigError, match="unknown setting 'train.colour'"):
        apply_overrides(cfg, {"train.colour": 1})
    for bad in ({"freeze_depth": 7}, {"augment_policy": "mixup"}, {"split_fractions": (0.5, 0.2, 0.2)}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


@pytest.mark.parametrize("toml, message", [
    ('[train]\nimage_size = "227"', "image_size = '227' has the wrong type; expected int"),
    ('[train]\namp = "no"', "amp = 'no' has the wrong type; expected bool"),  # a truthy string is not True
    ("num_samples = 2.5", "num_samples = 2.5 has the wrong type"),
    ("cpu = 5", "cpu = 5 has the wrong type"),
    ("train = 5", "[train] must be a table"),
    ("[space]\nfreeze_depths = []", "need at least one value"),
    ("[space]\nfreeze_depths = [2.5]", "freeze_depths = [2.5] has the wrong type"),
    ("[space]\nbatch_sizes = [0]", "space.batch_sizes >= 2"),
    ('[space]\nstart_points = [{ lr = 1e-3, freze_depth = 4 }]', "unknown key(s) ['freze_depth']"),
    ("[train]\nmomentum = -0.5", "must be in [0, 1)"),
    ('[train]\ndevice = "gpu"', "device='gpu' is unknown"),
    ("[train]\nlr = 0.05", "[train] lr is set by the study"),
    ("[train]\nepochs = 3", "use max_epochs / final_epochs"),
    ('[gpu]\n"cpus_per_trail" = 3', "[gpu]: unknown setting 'cpus_per_trail'"),  # checked on CPU machines too
    ('name = ""', "is not a folder name"),
    ("checkpoint_every = 0", "checkpoint_every=0 must be >= 1"),
    ("checkpoint_every = 1.5", "checkpoint_every = 1.5 has the wrong type"),
    ("seed = -1", "seed=-1"),
    ("repeat_top = 2\nrepeats = 1", "needs at least 2 seeds"),
    ("space = 3", "[space] must be a table"),
    ('[gpu]\nname = "big"', "a [cpu]/[gpu] profile sets name"),  # the folder is found before the profile is known
])
def test_bad_experiment_files_are_one_clear_error(toml: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    assert message in str(info.value)


def test_api_callers_may_pass_numpy_scalars_and_mps() -> None:
    cfg = TrainConfig(batch_size=np.int64(32), lr=np.float32(0.5), device="mps")
    assert type(cfg.batch_size) is int and type(cfg.lr) is float and cfg.device == "mps"


def test_experiment_file_seed_seeds_the_training_too(tmp_path: Path) -> None:
    path = tmp_path / "seeded.toml"
    path.write_text("seed = 7\n")
    assert load_study_config(path).train.seed == 7  # as --seed 7 does
    path.write_text("seed = 7\n[train]\nseed = 3\n")
    assert load_study_config(path).train.seed == 3


def test_fit_out_keeps_an_earlier_run_unless_overwrite_and_never_mixes_two(crack_data: Path, tmp_path: Path,
                                                                           monkeypatch, capsys) -> None:
    import crackcore.fit as fit_cli
    from crackcore.cli import run_main

    out = tmp_path / "run"
    args = ["--data", str(crack_data), "--subset", "40", "--epochs", "1", "--image-size", "32", "--weights", "random",
            "--out", str(out)]
    assert run_main(fit_cli.main, args) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run_main(fit_cli.main, args) == 1 and "is not empty (an earlier run?); pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    def half_written(tmp: Path, *rest, **kw) -> None:  # a write that fails part-way (a full disk, say)
        (tmp / "final_metrics.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fit_cli, "write_run_outputs", half_written)
    with pytest.raises(OSError):
        fit_cli.main([*args, "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first and [p.name for p in tmp_path.iterdir()] == ["run"]
    monkeypatch.undo()
    assert run_main(fit_cli.main, [*args, "--overwrite", "--seed", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1 and set(first) == {p.name for p in out.iterdir()}
    (tmp_path / "file").write_text("x")  # was: trained first, then failed with "File exists"
    assert run_main(fit_cli.main, [*args[:-1], str(tmp_path / "file")]) == 1
    assert "is a file; pass a folder" in capsys.readouterr().err
