"""`python -m crackcore.calibrate --model MODEL --labelled SITE_DIR --k 50 --out DIR`

Adapt a trained model to a new site with the few labelled images an inspector can provide: draw
k of the site's labelled images (stratified by class, seeded), fit the temperature and the
decision threshold on them, and score the model before and after on the rest of the folder
(n, accuracy, precision, recall, F1, each with a 95 % interval). `--fine-tune-head EPOCHS` also
refits the final layer (fc) alone on the k images, with its own temperature and threshold, as a
third column. Writes DIR/calibration.json, DIR/model.pt (the given weights with the new
temperature and threshold, which crackcore.predict applies), DIR/model_head.pt with
--fine-tune-head, and DIR/predictions.parquet. A calibration beside a study goes to
results/STUDY/calibration/SITE, where load_study and the report find it.
"""
from __future__ import annotations

import argparse
import copy
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from crackcore.calibration import THRESHOLD_RULE, apply_temperature, fit_temperature, fit_threshold
from crackcore.classifier import FieldModel, TorchClassifier, load_classifier, load_torch_meta, temperature_of, threshold_of
from crackcore.devices import resolve_device
from crackcore.exceptions import ConfigError, DataError
from crackcore.metrics import binary_metrics, metrics_with_intervals
from crackcore.outputs import check_replaceable, check_writable, claim_folder, save_torch, write_folder, write_json, write_parquet
from crackcore.results import CALIBRATION_FORMAT, is_calibration
from crackcore.sites import F1_INTERVAL, GROUP_BY, METRIC_KEYS, decode_all, site_samples

HEAD_LR, HEAD_BATCH = 1e-3, 8
DRAW_RULE = ("k images drawn per class in proportion to the folder's class shares (at least 2 each), in a seeded "
             "shuffle that takes one window per photo before a second one of any photo; every window of a drawn "
             "photo (either class) is left out of the evaluation rest")


def draw(samples: pd.DataFrame, k: int, seed: int) -> pd.Series:
    """Boolean mask of the k images to fit on (DRAW_RULE)."""
    n, counts = len(samples), samples["label"].value_counts()
    if k < 4:
        raise ConfigError(f"--k {k} leaves fewer than 2 images per class to fit a threshold on; pass --k 4 or more")
    if k >= n:
        raise ConfigError(f"--k {k} is not smaller than the {n} labelled images of the site, so none would be left "
                          f"to evaluate on; pass --k below {n} (e.g. 50)")
    k_crack = int(min(max(round(k * counts.get(1, 0) / n), 2), k - 2))
    want = {1: k_crack, 0: k - k_crack}
    for label, name in ((1, "crack"), (0, "no-crack")):
        if counts.get(label, 0) < want[label]:
            raise ConfigError(f"--k {k} needs {want[label]} {name} images but the site has {counts.get(label, 0)}; "
                              "pass a smaller --k or label more images")
    shuffled = samples.sample(frac=1, random_state=seed)
    order = shuffled.assign(_rank=shuffled.groupby("group").cumcount()).sort_values("_rank", kind="stable")
    return samples.index.isin(pd.concat([order[order["label"] == label].head(want[label]) for label in (1, 0)]).index)


@torch.inference_mode()
def features(field: FieldModel, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The 512 pooled features fc sees, for every image (float32, CPU): the head refit and all
    three columns' logits come from one pass of the backbone."""
    model, device = field.net, field.mean.device
    fc, model.fc = model.fc, nn.Identity()
    try:
        return torch.cat([model(field.normalise(b.to(device))).float().cpu() for b in images.split(batch_size)])
    finally:
        model.fc = fc


@torch.inference_mode()
def logit_crack(fc: nn.Linear, feats: torch.Tensor) -> np.ndarray:
    z = fc.cpu().float()(feats)
    return (z[:, 1] - z[:, 0]).double().numpy()


def refit_head(fc: nn.Linear, feats: torch.Tensor, labels: np.ndarray, epochs: int, seed: int) -> nn.Linear:
    """fc trained further (from its weights) on the k images' features alone: Adam, lr HEAD_LR,
    batches of HEAD_BATCH, seeded order, cross-entropy; the backbone is untouched."""
    head = copy.deepcopy(fc).cpu().float().train()
    y = torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=HEAD_LR)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(HEAD_BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(head(feats[idx]), y[idx]).backward()
            opt.step()
    return head.eval()


def score_column(logits: np.ndarray, labels: np.ndarray, fit: np.ndarray, rest: np.ndarray, groups: np.ndarray,
                 seed: int, temperature: float | None = None, threshold: float | None = None
                 ) -> tuple[dict[str, Any], np.ndarray]:
    """One column of the table: temperature and threshold fitted on `fit` (unless given), the
    figures on `rest`; and every image's prob_crack under it."""
    if temperature is None:
        temperature = fit_temperature(labels[fit], logits[fit])
    prob = apply_temperature(logits, temperature)
    if threshold is None:
        threshold = fit_threshold(labels[fit], prob[fit])
    pred = (prob >= threshold).astype(int)
    m = metrics_with_intervals(labels[rest], pred[rest], prob[rest], groups[rest], seed=seed)
    fit_m = binary_metrics(labels[fit], pred[fit], prob[fit])  # the k's own figures need no intervals
    return {"temperature": float(temperature), "threshold": float(threshold), **{k: m[k] for k in METRIC_KEYS},
            "f1_on_k": fit_m["f1"], "accuracy_on_k": fit_m["accuracy"]}, prob


def table(columns: dict[str, dict[str, Any]]) -> pd.DataFrame:
    pct = lambda v, ci: f"{100 * v:.1f} % ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"
    rows = {"temperature": lambda c: f"{c['temperature']:.3g}", "threshold": lambda c: f"{c['threshold']:.3g}",
            "n (rest)": lambda c: str(c["n"]),
            **{name: (lambda c, name=name: pct(c[name], c[f"{name}_ci95"])) for name in ("accuracy", "precision", "recall")},
            "F1": lambda c: f"{c['f1']:.3f} ({c['f1_ci95'][0]:.3f}-{c['f1_ci95'][1]:.3f})",
            "ECE": lambda c: f"{c['ece']:.3f}"}
    return pd.DataFrame({col: {row: f(c) for row, f in rows.items()} for col, c in columns.items()})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crackcore.calibrate", description=__doc__.split("\n\n")[1],
                                epilog="\n\n".join(textwrap.fill(t, 96) for t in (
                                    f"Threshold rule: {THRESHOLD_RULE}.", "Temperature: the NLL-minimising T on the k "
                                    "(T = 1 when the model gets all k right).", f"Draw: {DRAW_RULE}.",
                                    f"Intervals: accuracy, precision and recall Wilson 95 %; F1 {F1_INTERVAL}.")),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="a model.pt written by a study or crackcore.fit")
    p.add_argument("--labelled", required=True, type=Path, help="the new site's labelled folder (Positive/ Negative/ "
                   "or another layout crackcore.sources reads)")
    p.add_argument("--k", type=int, default=50, help="labelled images to fit on (default 50, >= 2 per class)")
    p.add_argument("--out", required=True, type=Path, help="a new folder, or an earlier calibration's (replaced); "
                   "beside a study: results/STUDY/calibration/SITE")
    p.add_argument("--seed", type=int, default=0, help="the draw, the head refit and the F1 bootstrap")
    p.add_argument("--fine-tune-head", type=int, default=0, metavar="EPOCHS", help="also refit fc alone on the k "
                   f"images for EPOCHS epochs (Adam, lr {HEAD_LR}, batch {HEAD_BATCH}): the 'head refit' column, "
                   "written to model_head.pt")
    p.add_argument("--group-by", default=GROUP_BY, help="regex whose first group names the photo a file was cut "
                   f"from (default {GROUP_BY!r}: PHOTO__rYcX.jpg); '' = every image its own photo")
    p.add_argument("--device", default="auto")
    return p


def check_out(out: Path) -> None:
    check_replaceable(out, "calibration.json", is_calibration, "crackcore.calibrate",
                      ", e.g. results/STUDY/calibration/SITE")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.time()
    if a.fine_tune_head < 0:
        raise ConfigError(f"--fine-tune-head {a.fine_tune_head} must be 0 (off) or a number of epochs")
    check_out(a.out)
    check_writable(a.out.parent, f"--out {a.out}", "choose another --out")  # before the work, not after
    with claim_folder(a.out):  # two calibrations started at once to one --out: one goes on
        check_out(a.out)  # again: another run may have written it since
        return calibrate(a, t0)


def calibrate(a: argparse.Namespace, t0: float) -> int:
    """The calibration, with --out claimed."""
    classifier = load_classifier(a.model, resolve_device(a.device))
    meta = classifier.meta
    if not isinstance(classifier, TorchClassifier):
        raise ConfigError(f"--model {a.model}: calibrate refits a model.pt (export the calibrated model.pt to ONNX "
                          "afterwards with python -m crackcore.export)")
    model = classifier.field.net
    root = a.labelled.expanduser().resolve()
    samples = site_samples(root, a.group_by)
    images, readable = decode_all(root, samples["path"], meta["image_size"])
    samples = samples[readable].reset_index(drop=True)
    fit = draw(samples, a.k, a.seed)
    rest = ~samples["group"].isin(samples.loc[fit, "group"]).to_numpy()
    if not rest.any():
        raise ConfigError(f"every photo of {root} has a window among the {a.k} drawn images, so none is left to "
                          "evaluate on; pass a smaller --k")
    labels, groups = samples["label"].to_numpy(), samples["group"].to_numpy()
    print(f"site {root}: {len(samples)} images ({int(labels.sum())} crack) from {samples['group'].nunique()} photos; "
          f"fit on {int(fit.sum())} ({int(labels[fit].sum())} crack), evaluate on {int(rest.sum())} "
          f"({int((~fit & ~rest).sum())} other windows of the drawn photos left out)", flush=True)
    if len(np.unique(labels[rest])) < 2:
        print("warning: the evaluation rest holds one class only; precision or recall is not informative",
              file=sys.stderr)
    feats = features(classifier.field, images)
    z = logit_crack(model.fc, feats)
    columns, probs = {}, {}
    columns["before"], probs["before"] = score_column(z, labels, fit, rest, groups, a.seed, temperature_of(meta),
                                                      threshold_of(meta))
    try:
        columns["after"], probs["after"] = score_column(z, labels, fit, rest, groups, a.seed)
        head = None
        if a.fine_tune_head:
            head = refit_head(model.fc, feats[torch.as_tensor(fit)], labels[fit], a.fine_tune_head, a.seed)
            columns["head refit"], probs["head refit"] = score_column(logit_crack(head, feats), labels, fit, rest,
                                                                      groups, a.seed)
    except ValueError as exc:  # fit_threshold: one class among the k (draw() keeps both, so a bug if seen)
        raise DataError(f"cannot fit a threshold: {exc}") from None
    record = {"format": CALIBRATION_FORMAT, "version": 1, "model": str(a.model.resolve()), "site": str(root),
              "site_name": root.name, "k": int(fit.sum()), "seed": a.seed, "group_by": a.group_by,
              "rule": THRESHOLD_RULE, "draw": DRAW_RULE, "f1_interval": F1_INTERVAL,
              "n_site": len(samples), "n_fit": int(fit.sum()), "n_rest": int(rest.sum()),
              "n_left_out": int((~fit & ~rest).sum()), "photos": int(samples["group"].nunique()),
              "head_refit": {"epochs": a.fine_tune_head, "lr": HEAD_LR, "batch_size": HEAD_BATCH} if head else None,
              "metrics": columns, "image_size": meta["image_size"], "device": str(meta["device"])}
    payload = load_torch_meta(a.model)
    summary = {k: record[k] for k in ("site", "site_name", "k", "seed", "rule", "n_rest")}

    def fill(tmp: Path) -> None:
        save_torch({**payload, "temperature": columns["after"]["temperature"], "threshold": columns["after"]["threshold"],
                    "calibration": {**summary, "before": columns["before"], "after": columns["after"]}}, tmp / "model.pt")
        if head is not None:
            state = {**payload["state_dict"], "fc.weight": head.weight.detach().clone(), "fc.bias": head.bias.detach().clone()}
            save_torch({**payload, "state_dict": state, "temperature": columns["head refit"]["temperature"],
                        "threshold": columns["head refit"]["threshold"],
                        "calibration": {**summary, "before": columns["before"], "head refit": columns["head refit"],
                                        "head_refit": record["head_refit"]}}, tmp / "model_head.pt")
        role = np.where(fit, "fit", np.where(rest, "eval", "left out"))
        write_parquet(samples.assign(role=role, logit_crack=z, **{f"prob_{c.replace(' ', '_')}": p for c, p in probs.items()}),
                      tmp / "predictions.parquet")
        write_json({**record, "seconds": time.time() - t0}, tmp / "calibration.json")  # last: the marker

    write_folder(a.out, fill)
    print(f"threshold rule: {THRESHOLD_RULE}\n")
    print(table(columns).to_string())
    print(f"\n95 % intervals on the evaluation rest: accuracy, precision, recall Wilson; F1 {F1_INTERVAL}")
    print(f"-> {a.out}/calibration.json, model.pt{', model_head.pt' if head else ''} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
