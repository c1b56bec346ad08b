"""python tune/report.py results/<study-name>

Turns a finished (or partly finished) study into report/report.md, report/index.html and PNG
figures. Reads the study only through crackcore.results.load_study. The report is built in a
temp folder and swapped in, so a re-run replaces it whole or not at all.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from crackcore.exceptions import StudyError, StudyFilesError  # noqa: E402
from crackcore.images import open_image  # noqa: E402
from crackcore.lift import lift_line  # noqa: E402
from crackcore.metrics import format_accuracy, roc_curve  # noqa: E402
from crackcore.outputs import check_writable, write_folder  # noqa: E402
from crackcore.results import Study, load_optuna_study, load_study  # noqa: E402
from crackcore.studyfiles import ERRORS, FINAL_METRICS, JOURNAL  # noqa: E402
from crackcore.sources import EMBEDDED_CITATION, EMBEDDED_SAMPLE  # noqa: E402
from crackcore.tracking import log_folder  # noqa: E402
from tune.trials import rank_trials  # noqa: E402

MAX_ERRORS_SHOWN = 36
STATUS_STYLE = {"COMPLETE": dict(ls="-", alpha=0.9), "PRUNED": dict(ls="--", alpha=0.45, color="0.55"),
                "DIVERGED": dict(ls="-.", alpha=0.6, color="orange"),
                "INTERRUPTED": dict(ls=":", alpha=0.6, color="0.3"),
                "ERROR": dict(ls=":", alpha=0.6, color="red")}
MARKERS = {"none": "o", "flip": "s", "flip_rotate": "^", "color": "D", "strong": "P"}


def _save(fig: plt.Figure, path: Path) -> None:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axes(ax: plt.Axes, grid: str = "both", epochs: bool = False, **labels: Any) -> None:
    """ax.set(**labels) and the report's light grid; an epoch axis ticks whole numbers."""
    if epochs:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(**labels)
    ax.grid(alpha=0.3, axis=grid)


def fig_learning_curves(s: Study, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    status = s.trials.set_index("trial_id")["status"].to_dict()
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, s.history["trial_id"].nunique())))
    for colour, (tid, h) in zip(colours, s.history.groupby("trial_id")):
        style = {"color": colour, **STATUS_STYLE.get(status.get(tid, "COMPLETE"), {})}
        for ax, col in zip(axes, ("val_acc", "val_loss")):
            ax.plot(h["epoch"], h[col], marker=".", **style)
    for ax, label in zip(axes, ("validation accuracy (fraction)", "validation loss (cross-entropy)")):
        _axes(ax, epochs=True, xlabel="epoch", ylabel=label)
    axes[1].set_yscale("log")
    handles = [plt.Line2D([], [], color="C0" if k == "COMPLETE" else v.get("color"), ls=v["ls"], label=k.lower())
               for k, v in STATUS_STYLE.items() if k in set(status.values())]
    axes[0].legend(handles=handles, title="trial status")
    fig.suptitle("Learning curves of every trial (dashed grey: stopped early by ASHA)")
    _save(fig, path)
    return "Each line is one trial; solid lines ran every epoch, dashed grey ones were stopped early by ASHA."


def fig_lr_vs_acc(s: Study, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    t = s.trials.dropna(subset=["best_val_acc"])
    norm = plt.Normalize(0, 5)
    for policy, g in t.groupby("augment_policy"):
        ax.scatter(g["lr"], g["best_val_acc"], c=g["freeze_depth"], cmap="plasma", norm=norm, s=60,
                        marker=MARKERS.get(policy, "o"), edgecolor="k", label=policy)
    _axes(ax, xscale="log", xlabel="learning rate (log scale)", ylabel="best validation accuracy (fraction)",
          title="Learning rate vs best validation accuracy")
    ax.legend(title="augmentation", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="plasma"), ax=ax, label="freeze depth (0 = all trainable)")
    _save(fig, path)
    return "Each point is a trial; colour is the freezing depth and the marker the augmentation policy."


def fig_by_category(s: Study, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    t = s.trials.dropna(subset=["best_val_acc"])
    for ax, col, title in zip(axes, ("freeze_depth", "augment_policy"), ("freeze depth", "augmentation policy")):
        groups = sorted(t[col].unique(), key=str)
        ax.boxplot([t.loc[t[col] == g, "best_val_acc"] for g in groups], tick_labels=[str(g) for g in groups])
        for i, g in enumerate(groups, start=1):
            y = t.loc[t[col] == g, "best_val_acc"]
            ax.scatter(np.full(len(y), i) + np.random.default_rng(i).uniform(-0.12, 0.12, len(y)), y, s=18, alpha=0.7)
        _axes(ax, "y", xlabel=title, title=f"best validation accuracy by {title}")
    axes[0].set_ylabel("best validation accuracy (fraction)")
    _save(fig, path)
    return "Boxes summarise the trials of each setting; dots are the trials themselves."


def fig_importance(s: Study, path: Path) -> str:
    import optuna

    study = load_optuna_study(s)
    if study is None:
        raise ValueError("no Optuna journal in the study folder")
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(completed) < 2:
        raise ValueError("fewer than 2 completed trials")
    if len({t.value for t in completed}) == 1:  # fANOVA has no variance to attribute
        raise ValueError(f"all {len(completed)} completed trials reached the same validation accuracy "
                         f"({completed[0].value:.4f}), so no setting explains a difference")
    importance = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names], color="C2")
    _axes(ax, "x", xlabel="importance (fANOVA share of val-accuracy variance)",
          title="Hyperparameter importance (completed trials)")
    _save(fig, path)
    ranking = ", ".join(f"{name} {share:.2f}" for name, share in importance.items())
    return ("Longer bars: that setting explains more of the differences in validation accuracy between completed "
            f"trials. Ranking: {ranking}.")


def fig_final_history(s: Study, path: Path) -> str:
    h = s.final_history
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (tr, va, label) in zip(axes, (("train_loss", "val_loss", "loss (cross-entropy)"),
                                          ("train_acc", "val_acc", "accuracy (fraction)"))):
        ax.plot(h["epoch"], h[tr], marker="o", label="train")
        ax.plot(h["epoch"], h[va], marker="o", label="validation")
        _axes(ax, epochs=True, xlabel="epoch", ylabel=label)
        ax.legend()
    fig.suptitle("Final retrain of the best configuration")
    _save(fig, path)
    return "Train and validation curves of the retrained best configuration; a widening gap would mean over-fitting."


def fig_confusion_roc(s: Study, path: Path) -> str:
    p = s.test_predictions()
    y, prob = p["true_label"].to_numpy(), p["prob_crack"].to_numpy()
    c = s.final_metrics["confusion"]  # the retrain's own count, not a second one
    cm = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        a1.text(j, i, f"{v}\n({100 * v / max(1, cm[i].sum()):.1f} % of row)", ha="center", va="center",
                color="white" if v > cm.max() / 2 else "black")
    a1.set(xticks=[0, 1], xticklabels=["no crack", "crack"], yticks=[0, 1], yticklabels=["no crack", "crack"],
           xlabel="predicted", ylabel="true", title=f"Confusion matrix (test, n={cm.sum()})")
    fpr, tpr = roc_curve(y == 1, prob)  # tied (saturated) probabilities are one step
    a2.plot(fpr, tpr, label=f"ROC-AUC {s.final_metrics.get('roc_auc', float('nan')):.4f}")
    a2.plot([0, 1], [0, 1], ls="--", color="0.6", label="chance")
    _axes(a2, xlabel="false positive rate", ylabel="true positive rate (recall)", title="ROC curve (test split)")
    a2.legend(loc="lower right")
    _save(fig, path)
    return "Left: counts of test images by true and predicted class. Right: the trade-off of recall against false alarms."


def fig_error_grid(s: Study, path: Path, cap: int) -> tuple[str, int]:
    errors = s.errors.head(cap)
    src = s.study.get("data_source", {})
    roots = {name: r["root"] for name, r in src.get("sources", {}).items()}
    cols = min(6, len(errors))
    rows = -(-len(errors) // cols)
    # at least two columns' width, so the title fits above a grid of one or two images
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.2 * cols, 4.4), 2.5 * rows + 0.3), squeeze=False,
                             layout="constrained")  # makes room for the suptitle, unlike tight_layout
    names = {0: "no crack", 1: "crack"}
    for ax in axes.flat:
        ax.axis("off")
    for ax, e in zip(axes.flat, errors.itertuples()):
        try:
            ax.imshow(open_image(Path(roots.get(getattr(e, "source", None), src.get("root", ""))) / e.path).convert("RGB"))
        except Exception:  # moved, unreadable, or a decompression bomb: the grid still shows the rest
            ax.text(0.5, 0.5, "image not\nreachable", ha="center", va="center", transform=ax.transAxes)
        where = f"{e.source}: " if len(roots) > 1 else ""
        ax.set_title(f"{where}true {names[e.true_label]}\npred {names[e.pred_label]}, p={e.prob_crack:.2f}", fontsize=8)
    fig.suptitle(f"Misclassified test images\n{len(errors)} of {len(s.errors)} shown, most confident first", fontsize=10)
    _save(fig, path)
    return "The final model's mistakes on the test split, most confident first.", len(errors)


def fig_per_set(s: Study, path: Path) -> str:
    t = s.per_set()
    if len(s.loso):
        t = pd.concat([t, s.loso.rename(columns={"held_out_source": "set"}).assign(role="leave-one-out")])
    labels = [f"{r.set} ({r.role})" for r in t.itertuples()]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(t) + 1.5))
    y = np.arange(len(t))[::-1]
    ax.errorbar(t["accuracy"], y, xerr=[t["accuracy"] - t["ci95_low"], t["ci95_high"] - t["accuracy"]], fmt="o",
                capsize=4)
    _axes(ax, "x", yticks=y, yticklabels=labels, xlim=(0, 1), xlabel="accuracy with Wilson 95 % interval",
          title="Final model on each evaluated set")
    ax.axvline(0.5, ls="--", color="0.6")
    _save(fig, path)
    return ("Accuracy of the final model on the in-domain test split, each held-out source and each external set "
            "(leave-one-out rows: the same setting retrained without that source); bars are 95 % intervals.")


def fig_shift_heatmap(s: Study, path: Path) -> str:
    """Test accuracy of the final model under each shift (rows) and severity (columns), clean first."""
    t = s.shift
    cells = t[t["severity"] > 0]
    p = cells.pivot(index="shift", columns="severity", values=["accuracy", "ci95_low", "ci95_high"]).reindex(
        list(dict.fromkeys(cells["shift"])))
    acc, low, high = p["accuracy"], p["ci95_low"], p["ci95_high"]
    clean = t.loc[t["severity"] == 0, "accuracy"]
    grid = acc.assign(**{"0": float(clean.iloc[0]) if len(clean) else np.nan})[["0", *acc.columns]]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(grid) + 1.8))
    im = ax.imshow(grid.to_numpy(float), cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for i, shift in enumerate(grid.index):
        for j, col in enumerate(grid.columns):
            ci = "" if col == "0" else f"\n{100 * low.at[shift, col]:.0f}-{100 * high.at[shift, col]:.0f}"
            ax.text(j, i, f"{100 * grid.iat[i, j]:.1f}{ci}", ha="center", va="center", fontsize=7)
    ax.set(xticks=range(len(grid.columns)), xticklabels=["0 (clean)", *map(str, acc.columns)], yticks=range(len(grid)),
           yticklabels=grid.index, xlabel="severity", title=f"Test accuracy under shifts (n={int(cells['n'].iloc[0])} per cell)")
    fig.colorbar(im, ax=ax, label="accuracy (fraction); 0.5 = chance")
    _save(fig, path)
    return ("Accuracy (%) of the final model on the test images under each shift and severity, with the Wilson 95 % "
            "interval below; column 0 is the clean images (the same subset).")


def _text(value: Any) -> str:
    """Text from user data (paths, names, messages) made inert in Markdown: HTML escaped, and no
    code span or link can start in it."""
    return re.sub(r"([\\`\[\]])", r"\\\1", html.escape(str(value), quote=False))


def _code(value: Any) -> str:
    """`value` as a Markdown code span (which escapes its HTML), fenced by more backticks than
    it holds, so a backtick in a path cannot end the span early."""
    text = str(value)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


# final_metrics.json's numbers the report formats: a wrong-typed one is a damaged file, not a traceback
METRIC_NUMBERS = ("test_accuracy", "n_test", "ci95_low", "ci95_high", "precision", "recall", "f1", "roc_auc", "ece",
                  "errors", "temperature", "ece_calibrated")
SET_NUMBERS = ("n", "accuracy", "ci95_low", "ci95_high", "precision", "recall", "f1")


def check_final_metrics(m: Any, path: Path) -> None:
    """One line naming the file and the key when final_metrics.json holds a value the report
    cannot format (hand-edited, or written by something else)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    fix = "restore it, or re-run the final retrain (python tune/run.py --study-name NAME --resume auto)"
    if not isinstance(m, dict):
        raise StudyFilesError(f"{path} holds a {type(m).__name__}, not an object of metrics; {fix}")
    bad = [(k, m[k]) for k in METRIC_NUMBERS if k in m and not number(m[k])]
    for group in ("per_source", "external"):
        sets = m.get(group, {})
        if not isinstance(sets, dict) or not all(isinstance(s, dict) for s in sets.values()):
            bad.append((group, sets))
            continue
        bad += [(f"{group}.{name}.{k}", s[k]) for name, s in sets.items() for k in SET_NUMBERS if k in s and not number(s[k])]
    if bad:
        key, value = bad[0]
        raise StudyFilesError(f"{path}: {key} is {value!r:.60} ({type(value).__name__}), not a number; {fix}")


def _table(df: pd.DataFrame) -> str:
    """A Markdown table (one string of lines; the `tables` extension renders it); text cells are
    user data (paths, set names) and escaped as such."""
    cols = list(df.columns)
    fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else _text(v)).replace("|", "\\|")
    return "\n".join(["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)] +
                      ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)])


ORDER = ("train", "val", "test", "external")


def split_counts_table(counts: dict[str, dict[str, int]]) -> pd.DataFrame:
    """{split: {class: images}} (data_source.counts) -> one row per split, a column per class and a total."""
    t = pd.DataFrame.from_dict(counts, orient="index").fillna(0).astype(int)
    t = t.loc[sorted(t.index, key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))]
    t["total"] = t.sum(axis=1)
    return t.rename_axis("split").reset_index()


def resources_table(resources: dict[str, float], nodes: int | None = None) -> pd.DataFrame:
    """Ray's cluster resources as a small table: memory in GiB, Ray's per-node markers
    (`node:<ip>`) counted as nodes rather than listed."""
    rows = [("nodes", str(nodes if nodes is not None else sum(k.startswith("node:") and "internal" not in k
                                                              for k in resources)))]
    for key, value in sorted(resources.items()):
        if key.startswith("node:"):
            continue
        name = key.replace("_", " ")
        rows.append((f"{name} (GiB)" if "memory" in key else name,
                     f"{value / 2 ** 30:.1f}" if "memory" in key else f"{value:g}"))
    return pd.DataFrame(rows, columns=["resource", "amount"])


def _params(params: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in (params or {}).items())


def _data_root(src: dict[str, Any]) -> str:
    root = src.get("root", "?")
    roots = root if isinstance(root, dict) else {None: root}
    return ", ".join(f"{_text(name) + ' ' if name else ''}{_code(r)}" + (f" (the embedded real sample, {EMBEDDED_CITATION})"
                                                              if r == str(EMBEDDED_SAMPLE) else "")
                     for name, r in roots.items())


def calibration_section(s: Study) -> list[str]:
    """The calibrations beside the study (results/STUDY/calibration/SITE, crackcore.calibrate):
    before / after / head refit on each site's evaluation rest, with 95 % intervals."""
    c = s.calibration
    if c.empty:
        return []
    span = lambda v, lo, hi: f"{v:.3f} ({lo:.3f}-{hi:.3f})"
    rows = [{"site": r.site, "k": r.k, "model": r.model, "T": f"{r.temperature:.3g}", "threshold": f"{r.threshold:.3g}",
             "n": r.n, "accuracy": span(r.accuracy, r.accuracy_low, r.accuracy_high),
             "precision": span(r.precision, r.precision_low, r.precision_high),
             "recall": span(r.recall, r.recall_low, r.recall_high), "F1": span(r.f1, r.f1_low, r.f1_high)}
            for r in c.itertuples()]
    return ["## Calibration for new sites", "",
            "`python -m crackcore.calibrate`: temperature and decision threshold fitted on k labelled images of the "
            "site (head refit: the final layer retrained on them too), scored on the rest of the site's images "
            "(windows of the drawn photos left out). 95 % intervals: Wilson; F1 a photo-level bootstrap.", "",
            _table(pd.DataFrame(rows)), ""]


def replay_section(replay: Path, out: Path) -> list[str]:
    """A tune.replay folder as a figure (redrawn here) and its speed table, in the report."""
    from tune.replay import REPLAY_FILES, draw

    missing = [name for name in REPLAY_FILES if not (replay / name).is_file()]
    if missing:
        raise StudyFilesError(f"--replay {replay}: {', '.join(missing)} missing; give a folder written by "
                              "python -m tune.replay --out DIR")
    anytime, reach = pd.read_parquet(replay / "anytime.parquet"), pd.read_parquet(replay / "reach.parquet")
    recipe = json.loads((replay / "replay.json").read_text())
    name = f"replay_{recipe['objective']}.png"
    draw(anytime, reach, out / name, recipe)
    table = reach.sort_values("median_fraction")[["searcher", "scheduler", "reached", "median_epochs", "median_fraction",
                                                  "fraction_ci95_low", "fraction_ci95_high", "final_iqm"]]
    return [f"## Searchers and schedulers replayed on {recipe['curves']} ({recipe['objective']})", "",
            f"![replay]({name})", "",
            f"Epochs to reach random+FIFO's final best (median over {recipe['repeats']} replayed studies, bootstrap "
            f"95 % CI), as a share of random+FIFO's {recipe['num_samples'] * recipe['budget']} epochs:", "",
            _table(table.round(3)), ""]


def top_trials_section(s: Study) -> list[str]:
    """The top 10 in the order the choice rule ranks them, with the figure it ranks on and the tie set marked."""
    t = s.trials
    metric = s.config.get("metric", "val_acc")
    reference = (s.best_config.get("reference") or {}).get("params")
    try:
        ranked = rank_trials(t, metric, reference)
    except (KeyError, StudyError):  # a journal-read table (stopped mid-search) has no last-epoch figures
        top = t.sort_values(["best_val_acc"], ascending=False).head(10)
        cols = [c for c in ("trial_id", "lr", "freeze_depth", "augment_policy", "status", "epochs", "best_val_acc")
                if c in top]
        return ["## Top 10 trials (by best val accuracy: the search has not ended)", "", _table(top[cols]), ""]
    figure = f"last_{metric}"
    ranked["rule_figure"] = ranked[figure].map(lambda v: f"{v:.4f}") + ranked["rule_se"].map(
        lambda v: "" if pd.isna(v) else f" ± {1.96 * v:.4f}")
    # then the trials outside the choice pool (stopped by ASHA when some ran all epochs), as they ended
    rest = t[~t["trial_id"].isin(ranked["trial_id"])].sort_values(figure, ascending=False)
    ranked = pd.concat([ranked, rest.assign(tied=False, is_reference=False)], ignore_index=True)
    top = ranked.assign(**{"rule figure": ranked["rule_figure"].fillna("(stopped early)"),
                           "tie set": np.where(ranked["tied"].astype(bool), "tied", ""),
                           "reference": np.where(ranked["is_reference"].astype(bool), "reference", "")}).head(10)
    cols = [c for c in ("trial_id", "lr", "freeze_depth", "augment_policy", "weight_decay", "batch_size", "status",
                        "epochs", "rule figure", "tie set", "reference", "last_val_loss", "seconds")
            if c in top]
    return ["## Top 10 trials", "",
            f"In the order the choice rule ranks them: by {figure[5:]} at the last epoch (± 1.96 standard errors over "
            f"the n val images), among the {int((t['status'] == 'COMPLETE').sum())} trials that ran all epochs. "
            f"`tied`: inside the noise of the leader ({int(ranked['tied'].astype(bool).sum())} setting(s), the tie "
            "set), where the reference setting, then the one training fewer parameters, then the lower val loss, is "
            "preferred.", "", _table(top[cols]), ""]


def lift_summary(s: Study) -> list[str]:
    """What tuning bought over the reference setting, one line per evaluated set."""
    m = s.final_metrics
    if not m:
        return []
    reference = m.get("reference") or {}
    if reference.get("is_pick"):
        return [f"the pick is the reference setting {_params(reference.get('params'))}: no lift to measure"]
    if not reference.get("retrained"):
        return ["lift over the reference: not measured (--no-reference, or a study from before it was recorded)"]
    return [lift_line(row["set"], row) for row in s.lift.to_dict("records")]


def fidelity_section(s: Study) -> list[str]:
    f = s.fidelity
    if not len(f):
        return []
    return ["## How well the early rungs predicted the end", "",
            "Spearman's rank correlation between the trials' ranking at each rung (by the study metric, what ASHA "
            "stops on) and their ranking by the choice rule at the last epoch, over the n trials that ran all epochs. "
            "A low value says the rung judges how fast a setting starts, not where it ends: raise grace_period.", "",
            _table(f.assign(spearman=f["spearman"].map(lambda v: "n/a (n < 3)" if pd.isna(v) else f"{v:.2f}"))), ""]


def summary_section(s: Study) -> tuple[list[str], list[str]]:
    """The warnings a reader must see first, what ran on what, and the split and cluster tables;
    (markdown lines, notes about what is missing)."""
    md, notes = [], []
    src, weights = s.study.get("data_source", {}), s.study.get("weights", {})
    if src.get("kind") == "synthetic":
        md += ["> **SYNTHETIC DATA.** This study ran on the procedural synthetic crack set; its numbers say nothing "
               "about real concrete. Run it without `--data` (the embedded real sample) or with `--data PATH`.", ""]
    if s.missing:
        notes.append("missing from the study folder: " + ", ".join(s.missing))
        md += [f"> Incomplete study: missing {', '.join(s.missing)}. Sections that need them are left out.", ""]
    status = s.trials["status"].value_counts().to_dict() if len(s.trials) else {}
    md += ["## Summary", "",
           f"- data: {src.get('kind', '?')} at {_data_root(src)}, {src.get('exact_duplicate_files', '?')} "
           f"byte-identical duplicates, split strategy {src.get('split_strategy', '?')}",
           f"- weights: {'random init (no ImageNet weights)' if weights.get('source') == 'random' else weights.get('path') or 'not recorded (no study.json)'}",
           f"- device of the final retrain: {s.study.get('final_device', '?')}",
           f"- trials: {len(s.trials)} ({', '.join(f'{v} {k.lower()}' for k, v in status.items())}); "
           f"up to {s.study.get('max_parallel_trials', '?')} in parallel" + (
               f"; read from the Optuna journal: the study stopped before its search ended (continue it with "
               f"`python tune/run.py --study-name {s.name} --resume auto`)" if s.trials_from == JOURNAL else ""),
           f"- wall time: {s.study['wall_seconds']:.0f} s (search {s.study['search_seconds']:.0f} s, "
           f"final retrain {s.study['final_seconds']:.0f} s)" if "wall_seconds" in s.study else
           "- wall time: not recorded (no study.json: the study did not finish)", ""]
    if src.get("counts"):
        md += ["### Images per split", "", _table(split_counts_table(src["counts"])), ""]
    if s.study.get("cluster_resources"):
        md += ["### Cluster", "", _table(resources_table(s.study["cluster_resources"], s.study.get("nodes"))), ""]
    return md, notes


def best_section(s: Study) -> list[str]:
    """The chosen setting, the rule and tie set that chose it, and its lift over the reference."""
    md: list[str] = []
    if s.best_config:
        tie = s.best_config.get("tie_set")
        md += ["## Best configuration", "", f"- trial {_code(s.best_config.get('trial_id'))}: {_text(_params(s.best_config.get('params')))}",
               f"- rule: {s.best_config.get('rule')}"]
        if tie is not None:
            md.append(f"- tie set: the study could not separate {len(tie)} setting(s) ({', '.join(_code(t) for t in tie)})")
        md += [f"- {line}" for line in lift_summary(s)] + [""]
    return md


def final_model_section(s: Study) -> list[str]:
    """The retrained model on the test split (and the split comparison), other sets, shifts, repeats."""
    md: list[str] = []
    per_set = s.per_set()
    m = s.final_metrics
    if m:
        md += ["## Final model on the held-out test split", "",
               f"- test accuracy {format_accuracy(m['test_accuracy'], m['n_test'], m['ci95_low'], m['ci95_high'])}",
               f"- precision {m['precision']:.4f}, recall {m['recall']:.4f}, F1 {m['f1']:.4f}, ROC-AUC {m['roc_auc']:.4f}",
               f"- expected calibration error {m['ece']:.4f}" + (f"; after temperature scaling (T = {m['temperature']:.2f}, "
               f"fitted on val) {m['ece_calibrated']:.4f}" if "temperature" in m else ""),
               f"- misclassified test images: {m['errors']} ([errors.parquet](../errors.parquet))", ""]
        if "split_comparison" in m:
            comparison = m["split_comparison"]
            rows = [{"split strategy": k, "test accuracy": format_accuracy(v["test_accuracy"], v["n_test"], v["ci95_low"],
                                                                          v["ci95_high"]), "groups": v.get("groups"),
                     "test images with a near-duplicate in train": v.get("test_images_with_near_duplicate_in_train", "?")}
                    for k, v in comparison.items()]
            md += ["### Random vs near-duplicate-grouped split", "", _table(pd.DataFrame(rows)), ""]
            if comparison.get("random", {}).get("test_images_with_near_duplicate_in_train") == 0:
                md += ["No test image of the random split has a near-duplicate in train, so here the two strategies "
                       "cannot differ by leakage; any difference is the split's sampling noise.", ""]
    if len(per_set) > 1 or len(s.loso):
        md += ["## Other structures", "", f"Selected on {_text(s.best_config.get('selection', 'the val split'))}.", "",
               _table(per_set[["set", "role", "n", "accuracy", "ci95_low", "ci95_high", "precision", "recall", "f1"]]), ""]
        if len(s.loso):
            md += ["### Leave one source out", "", _table(s.loso[["held_out_source", "n", "accuracy", "ci95_low",
                                                                  "ci95_high", "precision", "recall", "f1", "roc_auc"]]), ""]
    suite = s.final_metrics.get("shift")
    if suite:
        md += ["## Under camera and site shifts", "",
               f"The final model on {suite['n_per_cell']} of the {suite['of_n']} test images under {len(suite['cells'])} "
               f"shift x severity cells (crackcore.shift): clean {format_accuracy(suite['clean']['accuracy'], suite['clean']['n'], suite['clean']['ci95_low'], suite['clean']['ci95_high'])}, "
               f"mean over the shifted cells {100 * suite['mean_accuracy']:.2f} %. See the heat map below.", ""]
    if len(s.repeats):
        r = s.repeats.groupby("trial_id").agg(mean_val_acc=("val_acc", "mean"), ci95_low=("ci95_low", "first"),
                                              ci95_high=("ci95_high", "first"), seeds=("seed", "nunique"))
        md += ["### Seed repeats of the top configurations", "", _table(r.sort_values("mean_val_acc", ascending=False)
                                                                        .reset_index()), ""]
    return md


def figures_section(s: Study, out: Path, cap: int) -> list[str]:
    """Every figure the study's files allow, drawn into `out`; a figure that fails is explained."""
    per_set, suite = s.per_set(), s.final_metrics.get("shift")
    plans: list[tuple[str, str, Callable[[Path], Any], bool]] = [
        ("learning_curves.png", "Learning curves", lambda p: fig_learning_curves(s, p), len(s.history) > 0),
        ("lr_vs_val_acc.png", "Learning rate vs accuracy", lambda p: fig_lr_vs_acc(s, p), len(s.trials) > 0),
        ("val_acc_by_setting.png", "Accuracy by freeze depth and augmentation", lambda p: fig_by_category(s, p), len(s.trials) > 0),
        ("importance.png", "Hyperparameter importance", lambda p: fig_importance(s, p), len(s.trials) > 0),
        ("final_history.png", "Final retrain", lambda p: fig_final_history(s, p), len(s.final_history) > 0),
        ("confusion_roc.png", "Confusion matrix and ROC", lambda p: fig_confusion_roc(s, p), len(s.predictions) > 0),
        ("per_set.png", "Accuracy on each evaluated set", lambda p: fig_per_set(s, p), len(per_set) > 1 or len(s.loso) > 0),
        ("shift_heatmap.png", "Accuracy under shifts", lambda p: fig_shift_heatmap(s, p), bool(suite)),
    ]
    md = ["## Figures", ""]
    for name, title, draw, possible in plans:
        if not possible:
            continue
        try:
            sentence = draw(out / name)
            md += [f"### {title}", "", f"![{title}]({name})", "", sentence, ""]
        except Exception as exc:  # a figure that cannot be drawn is explained, not fatal
            md += [f"### {title}", "", f"Not drawn: {_text(str(exc).rstrip('.'))}.", ""]
    if ERRORS not in s.missing:
        md += ["### Misclassified images (test split, held-out sources, --eval sets)", ""]
        if s.errors.empty:
            md += ["No misclassified samples: the final model got every test image right.", ""]
        elif cap == 0:
            md += [f"{len(s.errors)} misclassified test images, listed in errors.parquet (grid off: --max-errors 0).", ""]
        else:
            sentence, shown = fig_error_grid(s, out / "errors_grid.png", cap)
            md += ["![Misclassified test images](errors_grid.png)", "",
                   f"{sentence} Showing {shown} of {len(s.errors)}.", ""]
    return md


def build_report(s: Study, out: Path, cap: int = MAX_ERRORS_SHOWN,
                 replays: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """Write figures and report.md into `out`. Returns (markdown lines, notes about what is missing)."""
    check_final_metrics(s.final_metrics, s.path / FINAL_METRICS)
    summary, notes = summary_section(s)
    md = [f"# Study report: {_text(s.name)}", "", *summary]
    if len(s.trials):
        md += top_trials_section(s)
    md += best_section(s) + fidelity_section(s) + final_model_section(s) + calibration_section(s)
    md += figures_section(s, out, cap)
    for replay in replays or []:
        md += replay_section(replay, out)
    (out / "report.md").write_text("\n".join(md))
    return md, notes


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}img{max-width:100%}"
       "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
       "th{background:#f3f3f3}blockquote{background:#fff3cd;padding:8px;border-left:4px solid #e0a800;margin:0}")


def render_html(md: list[str], title: str) -> str:
    """report.md as a standalone page (Python-Markdown with its `tables` extension). The report
    writes no raw HTML of its own, so Markdown's raw-HTML pass-through is switched off: any
    that reaches it from user data is shown as text."""
    import markdown

    converter = markdown.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert("\n".join(md))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tune/report.py", description="Figures and a readable report of a study.")
    p.add_argument("study", type=Path, help="results/<study-name>")
    p.add_argument("--max-errors", type=int, default=MAX_ERRORS_SHOWN, help="misclassified images shown in the grid")
    p.add_argument("--replay", type=Path, action="append", help="a tune.replay --out folder to add (repeatable)")
    a = p.parse_args(argv)
    if a.max_errors < 0:
        raise StudyFilesError(f"--max-errors must be >= 0 (got {a.max_errors}); 0 leaves the error grid out")
    s = load_study(a.study)
    check_writable(a.study, f"the report, {a.study / 'report'}", "copy the study folder somewhere writable first")
    notes: list[str] = []

    def fill(tmp: Path) -> None:
        md, found = build_report(s, tmp, a.max_errors, a.replay)
        (tmp / "index.html").write_text(render_html(md, f"Study report: {s.name}"))
        notes.extend(found)

    target = write_folder(a.study / "report", fill)
    if (mlflow := s.study.get("mlflow")) and mlflow.get("retrain_run_id"):  # a study run with --mlflow
        try:
            log_folder(mlflow["uri"], mlflow["retrain_run_id"], target, "report")
            print(f"mlflow: report logged to the retrain's run {mlflow['retrain_run_id']} at {mlflow['uri']}")
        except Exception as exc:  # the report is written; the store may be gone or unreachable from here
            print(f"warning: report not logged to MLflow at {mlflow['uri']}: {str(exc).splitlines()[0][:200]}",
                  file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report: {target / 'report.md'}\nhtml:   {target / 'index.html'}\nfigures: "
          + ", ".join(sorted(p.name for p in target.glob("*.png"))))
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
