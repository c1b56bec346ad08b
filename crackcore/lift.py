"""What tuning bought: the pick and the reference setting, retrained alike, compared on the same
images of every evaluated set (the test split, each held-out source, each --eval folder) with a
paired 95 % interval (metrics.paired_difference), and the sentence a study says about it."""
from __future__ import annotations

from typing import Any

import pandas as pd

from crackcore.metrics import paired_difference

TEST_SET = "test split"


def evaluated_sets(result: Any) -> dict[str, pd.DataFrame]:
    """A FitResult's per-image predictions on every set it was scored on, by set name."""
    return {TEST_SET: result.test["predictions"], **{n: m["predictions"] for n, m in result.held_out.items()},
            **{n: m["predictions"] for n, m in result.external.items()}}


def lift_by_set(pick: Any, reference: Any, groups: pd.Series | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per evaluated set: pick's and reference's accuracy and the pick's lift (pick - reference)
    with its paired 95 % bootstrap interval, resampling `groups` (by (source, path); e.g. the photo
    a window was cut from) where given, else images."""
    ref_sets = evaluated_sets(reference)
    out = {}
    for name, p in evaluated_sets(pick).items():
        both = p.merge(ref_sets[name], on=["source", "path"], suffixes=("", "_ref"), validate="one_to_one")
        if len(both) != len(p):
            raise ValueError(f"{name}: the reference was scored on other images than the pick")
        g = None
        if groups is not None:
            g = pd.MultiIndex.from_frame(both[["source", "path"]]).map(groups.to_dict()).to_numpy()
            g = None if pd.isna(g).any() else g
        d = paired_difference(both["true_label"] == both["pred_label"], both["true_label"] == both["pred_label_ref"],
                              g, seed=seed)
        out[name] = {"pick_accuracy": float((both["true_label"] == both["pred_label"]).mean()),
                     "reference_accuracy": float((both["true_label"] == both["pred_label_ref"]).mean()),
                     "lift": d["difference"], "ci95_low": d["ci95_low"], "ci95_high": d["ci95_high"], "n": d["n"],
                     "n_groups": d["n_groups"], "pick_only_right": d["a_only_right"],
                     "reference_only_right": d["b_only_right"], "resampled_by": "group" if g is not None else "image"}
    return out


def lift_line(name: str, lift: dict[str, Any]) -> str:
    """The one sentence: what tuning bought on this set, or that it bought nothing measurable."""
    figures = (f"{100 * lift['lift']:+.2f} points (paired 95 % CI {100 * lift['ci95_low']:+.2f}..{100 * lift['ci95_high']:+.2f}, "
               f"n={lift['n']}; pick {100 * lift['pick_accuracy']:.2f} %, reference {100 * lift['reference_accuracy']:.2f} %)")
    if lift["ci95_low"] > 0:
        return f"{name}: tuning bought {figures} over the reference"
    if lift["ci95_high"] < 0:
        return f"{name}: tuning COST {figures}: the reference setting is better here"
    return f"{name}: no measurable lift over the reference ({figures})"
