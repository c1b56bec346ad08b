"""The search's results as tables (trials.parquet, history.parquet) with each trial's
TrialParams, and the choice of the trial to retrain (best_rule: val accuracy, with a tie set
of the settings the data cannot separate), or of the tie set re-run over seeds (--repeat-top);
and how well ASHA's rungs predicted the end (rung_fidelity)."""
from __future__ import annotations

from functools import lru_cache
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from crackcore.config import SEARCH_KEYS, StudyConfig, TrialParams, trial_config
from crackcore.exceptions import StudyError
from crackcore.journal import open_journal
from tune.cluster import fit_remote
from tune.search import RAY_TRIAL_ID, is_setting


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
            n = ["val_n"] if "val_n" in hist else []  # the choice rule's standard errors
            h = hist[["epoch", "train_loss", "train_acc", "val_loss", *n, "val_acc", "current_lr", "seconds", "train_img_s",
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
            **({"last_val_n": float(last["val_n"])} if last is not None and "val_n" in hist else {}),
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
    rows = {r["trial_id"]: {**r, "from_journal": False} for r in trials.to_dict("records")}
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
    return pd.DataFrame(list(rows.values())).sort_values("trial_id").reset_index(drop=True), params_of


def max_parallel(trials: pd.DataFrame) -> int:
    """Most trials running at the same moment, from their start/end times."""
    ok = trials.dropna(subset=["start_time", "end_time"])
    events = sorted([(t, 1) for t in ok["start_time"]] + [(t, -1) for t in ok["end_time"]])  # ends first at a tie
    return int(np.cumsum([step for _, step in events]).max(initial=0))


Z95 = 1.959963984540054
BEST_RULE = ("highest {figure} at the last epoch among trials that ran all max_epochs; if none did, among all trials "
             "that reported and did not diverge. Trials whose {figure} is within 1.96 standard errors of the "
             "difference from the leader's (each accuracy's SE over the n val images with one image added right and "
             "one wrong, Agresti-Caffo, so 100 % still has a spread; unpaired, so conservative) form the tie set, which "
             "the data cannot separate; inside it the reference setting is preferred, then the one that trains fewer "
             "parameters, then the lower val log loss, then the higher {figure}, then the lower trial id")
METRIC_WORDS = {"val_acc": "val accuracy",
                "val_shift_acc": "val_shift_acc (the mean val accuracy over clean and shift.VAL_CELLS)"}


def best_rule(metric: str = "val_acc") -> str:
    """The choice rule in the words of the metric the study selects on. Accuracy decides what the
    data can separate; a val loss ranking alone chose an over-confident lr 0.1 over the reference
    at equal val accuracy, and it scored 0.67 points (paired CI -1.10..-0.25) below the reference
    on 4,800 other patches (README, "What tuning bought")."""
    return BEST_RULE.format(figure=METRIC_WORDS[metric])


def accuracy_se(p: pd.Series, n: pd.Series) -> pd.Series:
    """Standard error of an accuracy p over n images with one image added right and one wrong
    (Agresti-Caffo): a 157/161 and a 161/161 are then not 'separated' by a zero spread."""
    adjusted = (p * n + 1) / (n + 2)
    return np.sqrt(adjusted * (1 - adjusted) / (n + 2))


@lru_cache(maxsize=None)
def trainable_count(freeze_depth: int) -> int:
    """Parameters a setting trains: fewer is the simpler setting inside a tie set."""
    from crackcore.model import CrackResNet

    model = CrackResNet(int(freeze_depth))
    model.apply_freeze()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rule_figure(trials: pd.DataFrame, metric: str = "val_acc") -> pd.DataFrame:
    """Per trial, from the last epoch: rule_score (lower is better: minus the accuracy), its
    standard error rule_se (accuracy_se) and rule_loss (the val loss, a tie-breaker; NaN where Ray's
    result files were lost and the journal gave the accuracy alone). A table without last_val_n
    (an older study) gets NaN: then only equal scores tie."""
    n = trials["last_val_n"] if "last_val_n" in trials else pd.Series(np.nan, index=trials.index)
    p = trials[f"last_{metric}"]
    return pd.DataFrame({"rule_score": -p, "rule_se": accuracy_se(p, n), "rule_loss": trials["last_val_loss"]},
                        index=trials.index)


def rank_by_rule(table: pd.DataFrame, reference: dict[str, Any] | None = None, z: float = Z95) -> pd.DataFrame:
    """`table` (one row per setting, with rule_score lower-better, rule_se, rule_loss, freeze_depth,
    trial_id) ordered as the rule chooses, with `tied` (inside the noise of the leader: score -
    leader's <= z * sqrt(se^2 + se_leader^2)), `is_reference` and `trainable_params`. Row 0 is the
    choice: the tie set first, the reference preferred, then fewer trained parameters, then the
    lower loss, then the score."""
    t = table.dropna(subset=["rule_score"]).copy()
    leader = t.sort_values(["rule_score", "trial_id"]).iloc[0]
    margin = z * np.sqrt(t["rule_se"] ** 2 + leader["rule_se"] ** 2)
    t["tied"] = (t["trial_id"] == leader["trial_id"]) | (t["rule_score"] - leader["rule_score"] <= margin.fillna(0))
    t["is_reference"] = is_setting(t, reference)
    t["trainable_params"] = [trainable_count(d) for d in t.get("freeze_depth", pd.Series(0, index=t.index)).fillna(0)]
    t["_not_tied"], t["_not_ref"] = ~t["tied"], ~t["is_reference"]
    # outside the tie set the order is the score's alone
    t["_params"] = np.where(t["tied"], t["trainable_params"], 0)
    t["_ref"] = np.where(t["tied"], t["_not_ref"], False)
    t["_loss"] = np.where(t["tied"], t["rule_loss"], 0.0)
    order = ["_not_tied", "_ref", "_params", "_loss", "rule_score", "trial_id"]
    return t.sort_values(order).drop(columns=["_not_tied", "_not_ref", "_params", "_ref", "_loss"]).reset_index(drop=True)


def choice_pool(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials the rule chooses among: those that ran all max_epochs, else every trial that
    reported and did not diverge."""
    reported = trials[(trials["epochs"] > 0) & (trials["status"] != "DIVERGED")]
    if reported.empty and (trials["status"] == "DIVERGED").any():
        raise StudyError("every trial that reported diverged (non-finite training loss); lower space.lr_max in the "
                         "experiment file")
    if reported.empty:
        raise StudyError("every trial failed before reporting a metric; see errors in trials.parquet and Ray's logs")
    pool = reported[reported["status"] == "COMPLETE"]
    return pool if len(pool) else reported


def rank_trials(trials: pd.DataFrame, metric: str = "val_acc", reference: dict[str, Any] | None = None) -> pd.DataFrame:
    """The choice pool ranked by best_rule(metric) (rank_by_rule): row 0 is the trial to retrain,
    rows with `tied` the tie set."""
    pool = choice_pool(trials)
    return rank_by_rule(pool.join(rule_figure(pool, metric)), reference)


def pick_best(trials: pd.DataFrame, metric: str = "val_acc", reference: dict[str, Any] | None = None) -> pd.Series:
    """The trial to retrain by best_rule(metric)."""
    return rank_trials(trials, metric, reference).iloc[0]


def repeat_top(cfg: StudyConfig, ranked: pd.DataFrame, params_of: dict[str, TrialParams], data_ref: Any,
               backbone_ref: Any) -> pd.DataFrame:
    """Re-run the tie set (at most cfg.repeat_top settings, in the rule's order: `ranked` is
    rank_trials') R times with fresh seeds (same split) for the retrain's final_epochs. One seed
    cannot rank settings that differ by a few errors in a thousand."""
    top = ranked[ranked["tied"]].head(cfg.repeat_top)
    cfgs, rows = [], []
    for rank, row in enumerate(top.itertuples(index=False), start=1):
        params = params_of[row.trial_id]
        for r in range(cfg.repeats):
            seed = cfg.seed + 1000 * rank + r + 1
            cfgs.append(trial_config(cfg.train.replace(seed=seed), params, cfg.final_epochs))
            rows.append({"config_rank": rank, "trial_id": row.trial_id, "seed": seed, **params.to_dict()})
    results = fit_remote(data_ref, cfgs, backbone_ref, cfg.cpus_per_trial, cfg.gpus_per_trial, False, "repeat",
                         diverged_ok=True)
    for row, res in zip(rows, results):
        if res is None:  # as in the search: a diverged seed counts as the worst result
            row.update(val_acc=0.0, val_loss=float("nan"), n_val=0, diverged=True)
        else:
            shifted = res.history["val_shift_acc"].iloc[-1] if "val_shift_acc" in res.history else None
            row.update(val_acc=res.val["accuracy"], val_loss=res.val["loss"], n_val=res.val["n"], diverged=False,
                       **({"val_shift_acc": float(shifted)} if shifted is not None else {}))
    return pd.DataFrame(rows)


def rank_repeats(repeats: pd.DataFrame, metric: str = "val_acc", reference: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per setting the mean over seeds, ranked by the same rule as the trials (rank_by_rule) on the
    mean accuracy (`metric`): its standard error adds the spread over seeds to accuracy_se over the
    val images (the same images for every seed, so their noise does not average out). A diverged
    seed makes its setting's mean NaN, ranked last. Mean val accuracy keeps its 95 % t-interval
    over seeds."""
    from scipy.stats import t

    figure = repeats[metric].where(~repeats["diverged"].astype(bool)) if "diverged" in repeats else repeats[metric]
    g = repeats.assign(_figure=figure, _n=repeats.get("n_val", np.nan)).groupby(["config_rank", "trial_id"], sort=False)
    keys = [k for k in SEARCH_KEYS if k in repeats]
    ranked = g.agg(mean_val_acc=("val_acc", "mean"), sd_val_acc=("val_acc", "std"), repeats=("val_acc", "size"),
                   mean_val_loss=("val_loss", lambda v: v.mean(skipna=False)), n=("_n", "mean"),
                   mean_figure=("_figure", lambda v: v.mean(skipna=False)), sd_figure=("_figure", "std"),
                   **{k: (k, "first") for k in keys}).reset_index()
    half = t.ppf(0.975, (ranked["repeats"] - 1).clip(lower=1)) * ranked["sd_val_acc"].fillna(0) / ranked["repeats"] ** 0.5
    images = accuracy_se(ranked["mean_figure"], ranked["n"]).fillna(0)
    # an accuracy interval stays within [0, 1] (a t-interval over 2 seeds is wider than that)
    ranked = ranked.assign(ci95_low=(ranked["mean_val_acc"] - half).clip(lower=0),
                           ci95_high=(ranked["mean_val_acc"] + half).clip(upper=1),
                           rule_score=-ranked["mean_figure"], rule_loss=ranked["mean_val_loss"],
                           rule_se=np.sqrt(ranked["sd_figure"].fillna(0) ** 2 / ranked["repeats"] + images ** 2))
    ranked = ranked.drop(columns=["mean_figure", "sd_figure", "n"])
    ok, bad = ranked[ranked["rule_score"].notna()], ranked[ranked["rule_score"].isna()]
    if ok.empty:
        raise StudyError("every seed of every repeated setting diverged; lower space.lr_max in the experiment file")
    return pd.concat([rank_by_rule(ok, reference), bad.assign(tied=False)], ignore_index=True)


def rung_fidelity(trials: pd.DataFrame, history: pd.DataFrame, rungs: list[int], metric: str = "val_acc") -> pd.DataFrame:
    """How well each ASHA rung's ranking (by `metric`, what ASHA ranks on) predicted the ranking
    by the same figure at the last epoch (the choice rule's): Spearman's rho over the trials that ran all
    epochs (n); NaN below 3 trials. A low rho says the grace period is too short to judge by."""
    from scipy.stats import spearmanr

    done = trials.loc[trials["status"] == "COMPLETE", "trial_id"]
    if not len(history) or "epoch" not in history:
        return pd.DataFrame(columns=["rung", "n", "spearman"])
    h = history[history["trial_id"].isin(done)]
    final = h.sort_values("epoch").groupby("trial_id").tail(1).set_index("trial_id")[metric]
    rows = []
    for rung in rungs:
        at = h[h["epoch"] == rung].set_index("trial_id")[metric]
        both = pd.concat([at, final], axis=1, keys=["rung", "final"]).dropna()
        rho = float(spearmanr(both["rung"], both["final"]).statistic) if len(both) >= 3 else float("nan")
        rows.append({"rung": int(rung), "n": int(len(both)), "spearman": rho})
    return pd.DataFrame(rows, columns=["rung", "n", "spearman"])
