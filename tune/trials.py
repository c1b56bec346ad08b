"""The search's results as tables (trials.parquet, history.parquet) with each trial's
TrialParams, and the choice of the trial to retrain: by its last val accuracy, or by the
mean over seeds of the top trials re-run (--repeat-top)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from crackcore.config import StudyConfig, TrialParams, trial_config
from crackcore.exceptions import StudyError
from crackcore.results import open_journal
from tune.cluster import fit_remote
from tune.search import RAY_TRIAL_ID


def collect_trials(results: Any, cfg: StudyConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, TrialParams]]:
    """trials.parquet (one row per trial), history.parquet (one row per trial-epoch) and the
    TrialParams of each trial that started, by trial id."""
    trials, history, params_of = [], [], {}
    for r in results:
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        if r.config:  # None for a trial still pending when the study was interrupted
            params_of[trial_id] = TrialParams(**r.config)
        params = params_of[trial_id].to_dict() if r.config else {}
        if len(hist) and "epoch" in hist:
            hist = hist.drop_duplicates("epoch", keep="last").sort_values("epoch")
            per_source = sorted(c for c in hist if c.startswith("val_acc_"))  # when val holds several sources
            timing = [c for c in ("wall_time", "checkpoint_seconds", "checkpoint_bytes") if c in hist]
            shifted = [c for c in ("val_shift_acc", "val_shift_seconds") if c in hist]  # metric = "val_shift_acc"
            h = hist[["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "current_lr", "seconds", "train_img_s",
                      *per_source, *shifted, "node_id", "timestamp", *timing]].assign(trial_id=trial_id, **params)
            history.append(h)
        epochs = int(hist["epoch"].max()) if len(hist) and "epoch" in hist else 0
        diverged = "diverged" in hist and bool(hist["diverged"].iloc[-1] == True)  # noqa: E712 (NaN: False)
        # not done: stopped by Ctrl-C / a lost driver, not by ASHA (--resume continues it)
        status = ("ERROR" if r.error else "DIVERGED" if diverged else "COMPLETE" if epochs >= cfg.max_epochs else
                  "PRUNED" if (r.metrics or {}).get("done") else "INTERRUPTED")
        last = hist.iloc[-1] if len(hist) else None
        clock = hist["wall_time"] if "wall_time" in hist else hist.get("timestamp")
        trials.append({
            "trial_id": trial_id, **params, "status": status, "epochs": epochs,
            "best_val_acc": float(hist["val_acc"].max()) if last is not None else np.nan,
            "last_val_acc": float(last["val_acc"]) if last is not None else np.nan,
            "last_val_loss": float(last["val_loss"]) if last is not None else np.nan,
            **({"best_val_shift_acc": float(hist["val_shift_acc"].max()), "last_val_shift_acc": float(last["val_shift_acc"])}
               if last is not None and "val_shift_acc" in hist else {}),
            "seconds": float(hist["seconds"].sum()) if last is not None else np.nan,
            "checkpoint_bytes": float(hist.get("checkpoint_bytes", pd.Series(dtype=float)).sum()),
            "checkpoint_seconds": float(hist.get("checkpoint_seconds", pd.Series(dtype=float)).sum()),
            # from the trial function's start to its first epoch's start: data fetch, model build
            "startup_seconds": float(hist["wall_time"].iloc[0] - hist["seconds"].iloc[0] - hist["trial_start"].iloc[0])
            if last is not None and "trial_start" in hist else np.nan,
            # wall_time: the trial's float clock at each report (Ray's timestamp is whole seconds)
            "start_time": float(clock.min() - hist["seconds"].iloc[0]) if last is not None else np.nan,
            "end_time": float(clock.max()) if last is not None else np.nan,
            "node_id": str(last["node_id"]) if last is not None else None,
            "error": str(r.error).splitlines()[0][:300] if r.error else None,
        })
    trials_df = pd.DataFrame(trials, columns=None if trials else ["trial_id", "status", "epochs"])
    trials_df = trials_df.sort_values("trial_id").reset_index(drop=True)
    history_df = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    return trials_df, history_df, params_of


def earlier_trials(experiment: Path, results: Any) -> list[Any]:
    """The trials in Ray's experiment folder that `results` lacks: those of a Ray experiment whose
    damaged state was set aside (tune.storage.set_damaged_state_aside), read like Ray's results
    from their result.json (whole lines only: a torn last line is a write cut short) and params.json."""
    known = {Path(r.path).name for r in results}
    found = []
    for trial in sorted(experiment.glob("*/params.json")) if experiment.is_dir() else []:
        if trial.parent.name in known:
            continue
        rows = []
        for line in (trial.parent / "result.json").read_text(errors="replace").splitlines() \
                if (trial.parent / "result.json").is_file() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        try:
            config = json.loads(trial.read_text())
        except ValueError:
            config = None
        # Ray names a trial's folder TRAINABLE_TRIALID_INDEX_PARAMS_DATE; collect_trials falls back on that id
        ray_id = re.search(r"_([0-9a-f]{8}(?:_\d{5})?)_\d+_", trial.parent.name)
        metrics = rows[-1] if rows else ({"trial_id": ray_id[1]} if ray_id else {})
        found.append(SimpleNamespace(path=str(trial.parent), config=config, error=None, metrics=metrics,
                                     metrics_dataframe=pd.DataFrame(rows) if rows else None))
    return found


JOURNAL_STATUS = {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED", "FAIL": "ERROR", "RUNNING": "INTERRUPTED"}


def journal_wins(trials: pd.DataFrame, params_of: dict[str, TrialParams], study_dir: Path, cfg: StudyConfig
                 ) -> tuple[pd.DataFrame, dict[str, TrialParams]]:
    """The trials table with the Optuna journal as the record of each trial's status and epochs.
    Ray's result files can be torn or empty after a full disk (a COMPLETE trial then looks
    PRUNED with 0 epochs) or set aside with a damaged experiment state: where the journal knows
    more epochs or a later state than Ray's files, its status, epochs and metric win (the
    columns Ray alone had are left empty there), and a trial only the journal holds gets a row.
    Said in one line; `from_journal` marks those rows."""
    import optuna

    study = optuna.load_study(study_name=cfg.name, storage=open_journal(study_dir))
    rows = {r["trial_id"]: r for r in trials.to_dict("records")}
    for r in rows.values():
        r["from_journal"] = False
    by_params = {tuple(sorted(p.to_dict().items())): tid for tid, p in params_of.items()}
    fixed = []
    for t in study.get_trials(deepcopy=False):
        tid = t.user_attrs.get(RAY_TRIAL_ID) or by_params.get(tuple(sorted(t.params.items()))) or f"optuna-{t.number}"
        if t.state.name == "FAIL" and "orphaned" in t.user_attrs:
            rows.pop(tid, None)  # never ran, or interrupted and run again as a new trial (the note says which)
            continue
        if t.state.name not in JOURNAL_STATUS:
            continue  # queued
        values = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        epochs, status = max(t.intermediate_values, default=0), JOURNAL_STATUS[t.state.name]
        row = rows.get(tid)
        if row is not None and (epochs < row["epochs"] or (epochs == row["epochs"] and status in (row["status"], "INTERRUPTED"))
                                or (row["status"] in ("DIVERGED", "ERROR") and epochs <= row["epochs"])):
            continue  # Ray's files know as much as the journal, or more
        if row is None:
            params_of[tid] = TrialParams(**t.params)
            row = rows[tid] = {"trial_id": tid, **t.params}
        keep_last = row.get("epochs") == epochs  # Ray's last epoch is the journal's: its loss still holds
        row.update({"status": status, "epochs": int(epochs), "from_journal": True,
                    f"best_{cfg.metric}": max(values) if values else np.nan,
                    f"last_{cfg.metric}": values[-1] if values else np.nan})
        if not keep_last:
            row["last_val_loss"] = np.nan
        fixed.append(tid)
    if fixed:
        print(f"warning: Ray's result files of {len(fixed)} trial(s) disagree with the Optuna journal (torn or empty "
              f"after a full disk, or set aside with a damaged experiment state): trials.parquet takes their status, "
              f"epochs and {cfg.metric} from the journal ({', '.join(sorted(fixed))})", file=sys.stderr, flush=True)
    table = pd.DataFrame(list(rows.values()))
    return table.sort_values("trial_id").reset_index(drop=True), params_of


def max_parallel(trials: pd.DataFrame) -> int:
    """Most trials running at the same moment, from their start/end times."""
    ok = trials.dropna(subset=["start_time", "end_time"])
    events = sorted([(t, 1) for t in ok["start_time"]] + [(t, -1) for t in ok["end_time"]], key=lambda e: (e[0], e[1]))
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


BEST_RULE = ("highest val accuracy at the last epoch among trials that ran all max_epochs (ties: lower val loss, "
             "then lower trial id); if none did, among all trials that reported and did not diverge")
METRIC_WORDS = {"val_acc": "val accuracy",
                "val_shift_acc": "val_shift_acc (the mean val accuracy over clean and shift.VAL_CELLS)"}


def best_rule(metric: str = "val_acc") -> str:
    """BEST_RULE in the words of the metric the study selects on."""
    return BEST_RULE.replace("val accuracy", METRIC_WORDS[metric])


def pick_best(trials: pd.DataFrame, metric: str = "val_acc") -> pd.Series:
    """The trial to retrain by best_rule(metric), scored on `metric` (the study's: val_acc or val_shift_acc)."""
    reported = trials[(trials["epochs"] > 0) & (trials["status"] != "DIVERGED")]
    if reported.empty and (trials["status"] == "DIVERGED").any():
        raise StudyError("every trial that reported diverged (non-finite training loss); lower space.lr_max in the "
                         "experiment file")
    if reported.empty:
        raise StudyError("every trial failed before reporting a metric; see errors in trials.parquet and Ray's logs")
    pool = reported[reported["status"] == "COMPLETE"]
    pool = pool if len(pool) else reported
    return pool.sort_values([f"last_{metric}", "last_val_loss", "trial_id"], ascending=[False, True, True]).iloc[0]


def repeat_top(cfg: StudyConfig, trials: pd.DataFrame, params_of: dict[str, TrialParams], data_ref: Any,
               backbone_ref: Any) -> pd.DataFrame:
    """Re-run the top-K configs R times with fresh seeds (same split) for max_epochs. One
    seed cannot rank trials that differ by a few errors in a thousand."""
    done = trials[trials["status"] == "COMPLETE"].sort_values(["last_val_acc", "last_val_loss"], ascending=[False, True])
    top = done.head(cfg.repeat_top)
    cfgs, rows = [], []
    for rank, row in enumerate(top.itertuples(index=False), start=1):
        params = params_of[row.trial_id]
        for r in range(cfg.repeats):
            seed = cfg.seed + 1000 * rank + r + 1
            cfgs.append(trial_config(cfg.train.replace(seed=seed), params, cfg.max_epochs))
            rows.append({"config_rank": rank, "trial_id": row.trial_id, "seed": seed, **params.to_dict()})
    results = fit_remote(data_ref, cfgs, backbone_ref, cfg.cpus_per_trial, cfg.gpus_per_trial, False, "repeat",
                         diverged_ok=True)
    for row, res in zip(rows, results):
        if res is None:  # as in the search: a diverged seed counts as the worst result
            row.update(val_acc=0.0, val_loss=float("nan"), n_val=0, diverged=True)
        else:
            row.update(val_acc=res.val["accuracy"], val_loss=res.val["loss"], n_val=res.val["n"], diverged=False)
    return pd.DataFrame(rows)


def rank_repeats(repeats: pd.DataFrame) -> pd.DataFrame:
    """Mean val accuracy per config with a 95 % t-interval over seeds, best first."""
    from scipy.stats import t

    g = repeats.groupby(["config_rank", "trial_id"], sort=False)
    ranked = g.agg(mean_val_acc=("val_acc", "mean"), sd_val_acc=("val_acc", "std"), repeats=("val_acc", "size"),
                   mean_val_loss=("val_loss", "mean")).reset_index()
    half = t.ppf(0.975, (ranked["repeats"] - 1).clip(lower=1)) * ranked["sd_val_acc"].fillna(0) / ranked["repeats"] ** 0.5
    # an accuracy interval stays within [0, 1] (a t-interval over 2 seeds is wider than that)
    ranked = ranked.assign(ci95_low=(ranked["mean_val_acc"] - half).clip(lower=0),
                           ci95_high=(ranked["mean_val_acc"] + half).clip(upper=1))
    return ranked.sort_values(["mean_val_acc", "mean_val_loss"], ascending=[False, True]).reset_index(drop=True)
