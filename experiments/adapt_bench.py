"""Benchmark of crackcore.adapt (issue #28): a concrete-only model on the masonry and quay-wall
sets and on unseen concrete, zero-shot vs bn / tent / self-train (labels never used to adapt),
and each with calibrate's k = 50 labels after. Prints a markdown table; figures, not a test.

    PYTHONPATH=$PWD python experiments/adapt_bench.py --model /tmp/adapt-base/model.pt \
        --out /tmp/adapt-bench.json

Per site, the photos are split in two by crackcore.adapt.holdout_mask: the model adapts to the
images of one half (unlabelled) and every column is scored on the other half, less the photos
of the k = 50 images calibrate draws from it (so all columns share one evaluation set).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from crackcore.adapt import holdout_mask, load_net
from crackcore.adaptation import BN_LAYERS, METHODS, adapt_model, logit_crack, train_prior_of
from crackcore.calibrate import GROUP_BY, decode_all, draw, score_column, site_samples
from crackcore.classifier import load_torch_meta, temperature_of, threshold_of

SITES = {"masonry": "/work/shared/data/masonry-crack-sample", "quay-wall": "/work/shared/data/quay-wall-crack-sample"}
CONCRETE = "/work/shared/data/concrete-crack-sample"


def concrete_unseen(split: Path, per_class: int, seed: int) -> tuple[Path, pd.DataFrame]:
    """Concrete images of the shared sample that the model's run never listed (not trained, not
    validated, not tested on)."""
    samples = site_samples(Path(CONCRETE), GROUP_BY)
    used = set(pd.read_parquet(split)["path"])
    rest = samples[~samples["path"].isin(used)]
    rest = pd.concat([rest[rest["label"] == c].sample(per_class, random_state=seed) for c in (0, 1)])
    return Path(CONCRETE), rest.reset_index(drop=True)


def row(col: dict) -> dict:
    fa = col["fp"] / max(1, col["fp"] + col["tn"])
    fa_ci = wilson(col["fp"], col["fp"] + col["tn"])
    return {"n": col["n"], "accuracy": col["accuracy"], "accuracy_ci95": col["accuracy_ci95"], "f1": col["f1"],
            "f1_ci95": col["f1_ci95"], "false_alarm_rate": fa, "false_alarm_ci95": list(fa_ci),
            "threshold": col["threshold"]}


def wilson(k: int, n: int) -> tuple[float, float]:
    from crackcore.metrics import wilson_interval
    return wilson_interval(k, n)


def site_split(root: Path, samples: pd.DataFrame, size: int, k: int, seed: int) -> dict:
    """One site's images as every column sees them: the half adapted on (its labels kept only
    for the labelled ceiling of adapt_ceiling.py) and the scored half, less the photos of the k
    images calibrate draws there (`rest`)."""
    held = holdout_mask(samples["group"], seed)
    adapt_imgs, ok = decode_all(root, samples.loc[~held, "path"], size)
    adapt_labels = samples.loc[~held, "label"].to_numpy()[ok]
    scored = samples[held].reset_index(drop=True)
    imgs, ok = decode_all(root, scored["path"], size)
    scored = scored[ok].reset_index(drop=True)
    fit = np.asarray(draw(scored, k, seed))
    rest = ~scored["group"].isin(scored.loc[fit, "group"]).to_numpy()
    return {"adapt_imgs": adapt_imgs, "adapt_labels": adapt_labels, "imgs": imgs, "labels": scored["label"].to_numpy(),
            "groups": scored["group"].to_numpy(), "fit": fit, "rest": rest}


def bench_site(name: str, root: Path, samples: pd.DataFrame, meta: dict, variants: list[tuple[str, dict]],
               k: int, seed: int) -> dict:
    size, temperature, threshold = int(meta["image_size"]), temperature_of(meta), threshold_of(meta)
    sp = site_split(root, samples, size, k, seed)
    adapt_imgs, imgs, labels, groups, fit, rest = (sp[key] for key in ("adapt_imgs", "imgs", "labels", "groups",
                                                                        "fit", "rest"))
    print(f"{name}: adapt on {len(adapt_imgs)} unlabelled images, score {int(rest.sum())} "
          f"({int(labels[rest].sum())} crack) of {len(labels)} held-out (k={int(fit.sum())} drawn for calibrate)",
          flush=True)
    out = {"n_adapt": len(adapt_imgs), "n_scored": int(rest.sum()), "columns": {}, "seconds": {}, "prior": {}}
    base = load_net(meta, torch.device("cpu"))
    for label, kw in [("zero-shot", None), *variants]:
        net = copy.deepcopy(base)
        if kw is not None:
            t0 = time.time()
            rec = adapt_model(net, adapt_imgs, temperature=temperature, train_prior=train_prior_of(meta), seed=seed,
                              **kw)
            out["seconds"][label] = time.time() - t0
            out["prior"][label] = rec["prior"]["site_prior"]
        z = logit_crack(net, imgs)
        col, _ = score_column(z, labels, fit, rest, groups, seed, temperature, threshold)
        out["columns"][label] = row(col)
        if label in ("zero-shot", "bn", "self-train", "tent"):
            cal, _ = score_column(z, labels, fit, rest, groups, seed)
            out["columns"][f"{label} +cal k={k}"] = row(cal)
        c = out["columns"][label]
        print(f"  {label:<22} acc {100 * c['accuracy']:.1f} F1 {c['f1']:.3f} FA {100 * c['false_alarm_rate']:.1f} "
              f"({out['seconds'].get(label, 0):.1f} s)", flush=True)
    out["true_prior"] = float(labels.mean())
    return out


def cost(meta: dict, split: Path, n: int, seed: int) -> dict:
    root, samples = concrete_unseen(split, n // 2, seed + 1)
    imgs, _ = decode_all(root, samples["path"], int(meta["image_size"]))
    base = load_net(meta, torch.device("cpu"))
    secs = {}
    for method in METHODS:
        t0 = time.time()
        adapt_model(copy.deepcopy(base), imgs, method, temperature=temperature_of(meta), seed=seed)
        secs[method] = time.time() - t0
    return {"n": len(imgs), "seconds": secs, "threads": torch.get_num_threads()}


def fmt(c: dict) -> str:
    a, f, fa = c["accuracy_ci95"], c["f1_ci95"], c["false_alarm_ci95"]
    return (f"{100 * c['accuracy']:.1f} ({100 * a[0]:.0f}-{100 * a[1]:.0f}) | {c['f1']:.3f} ({f[0]:.2f}-{f[1]:.2f}) | "
            f"{100 * c['false_alarm_rate']:.1f} ({100 * fa[0]:.0f}-{100 * fa[1]:.0f})")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concrete", type=int, default=600, help="unseen concrete images (half adapted on, half scored)")
    p.add_argument("--cost-n", type=int, default=1000)
    p.add_argument("--layers-study", action="store_true", help="also bn with each --bn-layers choice and mix 0.5")
    a = p.parse_args()
    meta = load_torch_meta(a.model)
    split = a.model.parent / "split.parquet"
    variants = [("bn", {"method": "bn"}), ("bn no prior", {"method": "bn", "prior": False}),
                ("tent", {"method": "tent"}), ("self-train", {"method": "self-train"})]
    if a.layers_study:
        variants += [(f"bn {l}", {"method": "bn", "layers": l, "prior": False}) for l in BN_LAYERS if l != "trained"]
        variants += [("bn mix 0.5", {"method": "bn", "mix": 0.5, "prior": False})]
    results = {"model": str(a.model), "weights": meta.get("weights"), "sites": {}}
    for name, root in SITES.items():
        results["sites"][name] = bench_site(name, Path(root), site_samples(Path(root), GROUP_BY), meta, variants,
                                            a.k, a.seed)
        a.out.write_text(json.dumps(results, indent=2))  # what is done so far survives an interrupted run
    croot, csamples = concrete_unseen(split, a.concrete // 2, a.seed)
    results["sites"]["concrete (unseen)"] = bench_site("concrete (unseen)", croot, csamples, meta, variants, a.k, a.seed)
    a.out.write_text(json.dumps(results, indent=2))
    if a.cost_n:
        results["cost"] = cost(meta, split, a.cost_n, a.seed)
        print("cost:", results["cost"], flush=True)
    a.out.write_text(json.dumps(results, indent=2))
    print("\n| site | column | accuracy % (95 % CI) | F1 (95 % CI) | false alarms % (95 % CI) | n |")
    print("|---|---|---|---|---|---|")
    for site, r in results["sites"].items():
        for col, c in r["columns"].items():
            print(f"| {site} | {col} | {fmt(c)} | {c['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
