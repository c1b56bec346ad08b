"""python -m tune.replay curves.parquet --searchers tpe,random --schedulers asha,fifo --workers 2 --repeats 30 --out DIR

Whole studies replayed in simulated time against a learning-curve table (tune.curves): which
searcher and scheduler find a good setting in the fewest epochs, on this problem.

Each study drives the objects the real study builds (tune.search's make_searcher and
make_scheduler) as Ray's TuneController calls them, so what is measured is Ray's and Optuna's own
code, not a model of it; the README ("Searchers and schedulers") details the replay and its outputs."""
from __future__ import annotations

import argparse
import heapq
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from scipy.stats import trim_mean

from crackcore.config import SCHEDULERS, SEARCHERS, SearchSpace, StudyConfig
from crackcore.exceptions import ConfigError
from crackcore.outputs import write_folder, write_json, write_parquet
from tune.search import make_scheduler, make_searcher

REFERENCE = ("random", "fifo")  # what every pair is measured against
NEEDED = ["lr", "freeze_depth", "augment_policy", "epoch", "seconds"]
BOOTSTRAP = 2000
REPLAY_FILES = ("runs.parquet", "anytime.parquet", "reach.parquet", "replay.json")


class ReplayError(ConfigError):
    """A replay that cannot run: a bad table, budget or method."""


@dataclass
class Curves:
    """The table as arrays: settings' params, objective[setting, epoch-1], seconds[setting, epoch-1]."""

    params: pd.DataFrame
    objective: np.ndarray
    seconds: np.ndarray

    @classmethod
    def load(cls, path: Path, objective: str) -> "Curves":
        if not path.is_file():
            raise ReplayError(f"curves table {path} does not exist; record one with python -m tune.curves")
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow's errors for a non-Parquet file vary
            raise ReplayError(f"{path} is not a Parquet table ({type(exc).__name__}); give a tune.curves output") from None
        return cls.from_table(table, objective, str(path))

    @classmethod
    def from_table(cls, table: pd.DataFrame, objective: str, where: str = "the table") -> "Curves":
        missing = [c for c in [*NEEDED, objective] if c not in table.columns]
        if missing:
            have = sorted(c for c in table.columns if c.startswith("val_acc"))
            raise ReplayError(f"{where} lacks column(s) {', '.join(missing)} (objectives there: {', '.join(have) or 'none'});"
                              " record it with python -m tune.curves, or pick --objective from those")
        keys = ["lr", "freeze_depth", "augment_policy"]
        table = table.sort_values([*keys, "epoch"])
        epochs = int(table["epoch"].max())
        counts = table.groupby(keys, sort=True)["epoch"].apply(lambda e: sorted(e) == list(range(1, epochs + 1)))
        if not counts.all():
            bad = counts[~counts].index[0]
            raise ReplayError(f"{where}: setting {dict(zip(keys, bad))} lacks some of epochs 1..{epochs}; every setting "
                              "needs every epoch (finish the recording with python -m tune.curves --resume)")
        if table[[objective, "seconds"]].isna().any().any():
            raise ReplayError(f"{where}: {objective} or seconds has missing values; record the table again")
        params = table[keys].drop_duplicates().reset_index(drop=True)  # one row per setting and epoch, checked above
        return cls(params, table[objective].to_numpy(float).reshape(-1, epochs),
                   table["seconds"].to_numpy(float).reshape(-1, epochs))

    @property
    def epochs(self) -> int:
        return self.objective.shape[1]

    def space(self) -> SearchSpace:
        """The study's search space over what the table holds."""
        lr = self.params["lr"]
        return SearchSpace(lr_min=float(lr.min()), lr_max=float(lr.max()),
                           freeze_depths=sorted(int(d) for d in self.params["freeze_depth"].unique()),
                           augment_policies=sorted(self.params["augment_policy"].unique()))

    def nearest(self, point: dict[str, Any]) -> int:
        same = self.params[(self.params["augment_policy"] == point["augment_policy"])
                           & (self.params["freeze_depth"] == point["freeze_depth"])]
        return int((np.log(same["lr"]) - math.log(point["lr"])).abs().idxmin())


@dataclass(eq=False)
class _Trial:
    """What Ray's schedulers read of a trial: its id (and identity, as a dict key) and config."""

    trial_id: str
    setting: int
    config: dict[str, Any] = field(default_factory=dict)  # the suggested point (the scheduler spares the reference)
    epoch: int = 0
    last: float = float("nan")
    done: bool = False


@dataclass
class Study:
    """One replayed study's record: the incumbent's score after each epoch spent."""

    scores: list[float] = field(default_factory=list)
    trials: int = 0
    stopped_early: int = 0


def incumbent(trials: list[_Trial], max_epochs: int) -> float:
    """The best last value among trials that ran max_epochs, else among all (the choice rule, no tie set)."""
    complete = [t.last for t in trials if t.epoch >= max_epochs]
    return max(complete) if complete else max(t.last for t in trials if t.epoch > 0)


def replay_study(curves: Curves, cfg: StudyConfig, workers: int, folder: Path) -> Study:
    """One study of cfg.num_samples trials with `workers` slots, in simulated time."""
    searcher = make_searcher(cfg, folder)
    scheduler = make_scheduler(cfg)
    scheduler.set_search_properties(cfg.metric, "max")
    np.random.seed(cfg.seed)  # AsyncHyperBandScheduler draws a trial's bracket from NumPy's global generator
    events: list[tuple[float, int, _Trial]] = []  # (finish time of the trial's next epoch, tie-break, trial)
    trials: list[_Trial] = []
    study = Study()

    def start(now: float) -> None:
        while len(events) < workers and len(trials) < cfg.num_samples:
            tid = f"t{len(trials):03d}"
            point = searcher.suggest(tid)
            if point is None:
                return
            trial = _Trial(tid, curves.nearest(point), point)
            trials.append(trial)
            scheduler.on_trial_add(None, trial)
            heapq.heappush(events, (now + curves.seconds[trial.setting, 0], len(trials), trial))

    start(0.0)
    seq = 0
    while events:
        now, _, trial = heapq.heappop(events)
        trial.epoch += 1
        trial.last = float(curves.objective[trial.setting, trial.epoch - 1])
        result = {cfg.metric: trial.last, "epoch": trial.epoch, "training_iteration": trial.epoch, "time_total_s": now}
        decision = scheduler.on_trial_result(None, trial, result)
        if decision != "STOP":
            searcher.on_trial_result(trial.trial_id, result)
        if decision == "STOP" or trial.epoch >= cfg.max_epochs:
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial.trial_id, result)
            study.stopped_early += trial.epoch < cfg.max_epochs
        else:
            seq += 1
            heapq.heappush(events, (now + curves.seconds[trial.setting, trial.epoch], -seq, trial))
        study.scores.append(incumbent(trials, cfg.max_epochs))
        start(now)
    study.trials = len(trials)
    return study


def study_config(curves: Curves, searcher: str, scheduler: str, repeat: int, args: argparse.Namespace) -> StudyConfig:
    return StudyConfig(name="replay", num_samples=args.num_samples, max_epochs=args.budget, searcher=searcher,
                       scheduler=scheduler, grace_period=min(args.grace_period, args.budget),
                       reduction_factor=args.reduction_factor, seed=repeat, space=curves.space())


def iqm_ci(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interquartile mean over axis 0 (the repeats) and its percentile-bootstrap 95 % CI."""
    iqm = trim_mean(x, 0.25, axis=0)
    boot = trim_mean(x[rng.integers(0, len(x), size=(BOOTSTRAP, len(x)))], 0.25, axis=1)
    return iqm, *np.percentile(boot, [2.5, 97.5], axis=0)


def median_ci(x: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Median and percentile-bootstrap 95 % CI of values that may be inf (never reached): ranks,
    not interpolation between an inf and a number."""
    boot = np.quantile(x[rng.integers(0, len(x), size=(BOOTSTRAP, len(x)))], 0.5, axis=1, method="inverted_cdf")
    return (float(np.quantile(x, 0.5, method="inverted_cdf")),
            *(float(v) for v in np.quantile(boot, [0.025, 0.975], method="inverted_cdf")))


def epochs_to_reach(scores: np.ndarray, target: float) -> float:
    hit = np.flatnonzero(scores >= target - 1e-12)
    return float(hit[0] + 1) if len(hit) else math.inf


def summarise(runs: pd.DataFrame, anytime_scores: dict[tuple[str, str], np.ndarray], full: int,
              seed: int, target: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """anytime (IQM + CI per cumulative epoch, per pair) and reach (epochs to `target`, by default
    random + FIFO's median final best)."""
    rng = np.random.default_rng(seed)
    rows = []
    for (searcher, scheduler), scores in anytime_scores.items():
        iqm, low, high = iqm_ci(scores, rng)
        rows.append(pd.DataFrame({"searcher": searcher, "scheduler": scheduler, "epochs": np.arange(1, scores.shape[1] + 1),
                                  "iqm": iqm, "ci95_low": low, "ci95_high": high}))
    anytime = pd.concat(rows, ignore_index=True)
    reference = runs[(runs["searcher"] == REFERENCE[0]) & (runs["scheduler"] == REFERENCE[1])]
    target = float(np.median(reference["final"])) if target is None else target
    reach = []
    for (searcher, scheduler), group in runs.groupby(["searcher", "scheduler"], sort=False):
        epochs = np.array([epochs_to_reach(anytime_scores[searcher, scheduler][i], target) for i in range(len(group))])
        med, low, high = median_ci(epochs / full, rng)
        final, f_low, f_high = (float(v[0]) for v in iqm_ci(group["final"].to_numpy()[:, None], rng))
        reach.append({"searcher": searcher, "scheduler": scheduler, "repeats": len(group), "target": target,
                      "reached": float(np.isfinite(epochs).mean()), "median_epochs": med * full,
                      "median_fraction": med, "fraction_ci95_low": low, "fraction_ci95_high": high,
                      "speedup": 1 / med if med > 0 else math.inf,
                      "final_iqm": final, "final_ci95_low": f_low, "final_ci95_high": f_high,
                      "epochs_spent": float(group["epochs"].median()), "trials_stopped_early": float(group["stopped_early"].mean()),
                      "cpu_seconds_per_repeat": float(group["cpu_seconds"].mean())})
    return anytime, pd.DataFrame(reach)


def draw(anytime: pd.DataFrame, reach: pd.DataFrame, path: Path, recipe: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    colours = plt.get_cmap("tab20").colors
    for k, ((searcher, scheduler), g) in enumerate(anytime.groupby(["searcher", "scheduler"], sort=False)):
        ref = (searcher, scheduler) == REFERENCE
        line, = ax.plot(g["epochs"], g["iqm"], label=f"{searcher}+{scheduler}", lw=2.2 if ref else 1.2,
                        color="k" if ref else colours[k % 20])
        ax.fill_between(g["epochs"], g["ci95_low"], g["ci95_high"], color=line.get_color(), alpha=0.08)
    ax.axhline(reach["target"].iloc[0], color="k", ls=":", lw=1, label="target (default: random+fifo final, median)")
    ax.set(xlabel="cumulative epochs", ylabel="incumbent score (IQM, 95 % CI)", title=f"{recipe['objective']}: "
           f"{recipe['num_samples']} trials, {recipe['workers']} workers, {recipe['repeats']} repeats")
    ax.legend(fontsize=7, ncol=2)
    r = reach.assign(label=reach["searcher"] + "+" + reach["scheduler"]).sort_values("median_fraction")
    finite = r["median_fraction"].replace(math.inf, np.nan)
    bx.barh(r["label"], finite.fillna(0), xerr=[(finite - r["fraction_ci95_low"]).fillna(0).clip(lower=0),
                                                 (r["fraction_ci95_high"].replace(math.inf, np.nan) - finite).fillna(0).clip(lower=0)],
            color=["tab:gray" if np.isnan(v) else "tab:blue" for v in finite])
    for y, v in enumerate(finite):
        if np.isnan(v):
            bx.text(0.01, y, "not reached in half the studies", va="center", fontsize=7, color="0.4")
    bx.axvline(0.5, color="k", ls=":", lw=1)
    bx.set(xlim=(0, 1.05), xlabel="share of random+fifo's epochs spent to reach its final best (median, 95 % CI)",
           title="epochs to reach random+fifo's final best")
    bx.xaxis.label.set_size(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.replay", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("curves", type=Path, help="a tune.curves table")
    p.add_argument("--searchers", default="tpe,random", help=f"comma-separated, of {', '.join(SEARCHERS)}")
    p.add_argument("--schedulers", default="asha,fifo", help=f"comma-separated, of {', '.join(SCHEDULERS)}")
    p.add_argument("--workers", type=int, default=2, help="trials at once")
    p.add_argument("--repeats", type=int, default=30, help="studies per pair (seeds 0..R-1)")
    p.add_argument("--num-samples", type=int, default=32, help="trials per study")
    p.add_argument("--budget", type=int, help="max epochs per trial (default: all the table holds)")
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--objective", default="val_acc", help="a column: val_acc (in-domain) or val_acc_<held-out source>")
    p.add_argument("--target", type=float, help="the score to reach (default: random + FIFO's median final best; on a "
                   "table of few images that median sits on a step, so also ask for the table's best)")
    p.add_argument("--out", type=Path, required=True, help="folder for the outputs (replaced whole)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.searcher_list = [s.strip() for s in a.searchers.split(",") if s.strip()]
    a.scheduler_list = [s.strip() for s in a.schedulers.split(",") if s.strip()]
    for kind, names, known in (("searcher", a.searcher_list, SEARCHERS), ("scheduler", a.scheduler_list, SCHEDULERS)):
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise ReplayError(f"--{kind}s: unknown {kind} {', '.join(unknown) or '(none given)'}; use {', '.join(known)}")
    for name in ("workers", "repeats", "num_samples", "grace_period"):
        if getattr(a, name) < 1:
            raise ReplayError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.repeats < 4:
        raise ReplayError(f"--repeats {a.repeats}: an interquartile mean needs at least 4 repeats")
    if "random" not in a.searcher_list or "fifo" not in a.scheduler_list:
        a.searcher_list = list(dict.fromkeys([*a.searcher_list, "random"]))  # the reference pair is always run
        a.scheduler_list = list(dict.fromkeys([*a.scheduler_list, "fifo"]))
    return a


def run_replay(a: argparse.Namespace, curves: Curves, log: Any = print) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    pairs = [(s, c) for s in a.searcher_list for c in a.scheduler_list]
    for s, c in pairs:  # a pair the study refuses (cmaes on a categorical space) is refused here, before any work
        study_config(curves, s, c, 0, a)
    full = a.num_samples * a.budget
    runs, anytime_scores = [], {}
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        for searcher, scheduler in pairs:
            scores = np.empty((a.repeats, full))
            for r in range(a.repeats):
                t = time.process_time()
                folder = Path(tmp) / f"{searcher}-{scheduler}-{r}"
                folder.mkdir()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna's per-sampler notes, once per study
                    study = replay_study(curves, study_config(curves, searcher, scheduler, r, a), a.workers, folder)
                s = np.asarray(study.scores)
                scores[r] = np.concatenate([s, np.full(full - len(s), s[-1])])  # a study that stopped early keeps its best
                runs.append({"searcher": searcher, "scheduler": scheduler, "repeat": r, "final": s[-1], "epochs": len(s),
                             "trials": study.trials, "stopped_early": study.stopped_early,
                             "cpu_seconds": time.process_time() - t})
            anytime_scores[searcher, scheduler] = scores
            last = pd.DataFrame(runs[-a.repeats:])
            log(f"{searcher}+{scheduler}: final {last['final'].median():.4f} (median of {a.repeats}), "
                f"{last['epochs'].median():.0f} epochs, {last['cpu_seconds'].mean():.2f} s CPU per study")
    runs_df = pd.DataFrame(runs)
    anytime, reach = summarise(runs_df, anytime_scores, full, seed=0, target=a.target)
    return runs_df, anytime, reach


def main(argv: list[str] | None = None) -> int:
    t0 = time.time()
    a = parse(argv)
    curves = Curves.load(a.curves, a.objective)
    a.budget = a.budget or curves.epochs
    if not 1 <= a.budget <= curves.epochs:
        raise ReplayError(f"--budget {a.budget} epochs is more than {a.curves} holds ({curves.epochs} per setting); "
                          f"give --budget 1..{curves.epochs} or record a longer table")
    print(f"{len(curves.params)} settings x {curves.epochs} epochs, objective {a.objective}; {a.num_samples} trials x "
          f"{a.budget} epochs per study, {a.workers} workers, {a.repeats} repeats", flush=True)
    runs, anytime, reach = run_replay(a, curves)

    def fill(d: Path) -> None:
        write_parquet(runs, d / "runs.parquet")
        write_parquet(anytime, d / "anytime.parquet")
        write_parquet(reach, d / "reach.parquet")
        write_json({"curves": str(a.curves), "objective": a.objective, "workers": a.workers, "repeats": a.repeats,
                    "num_samples": a.num_samples, "budget": a.budget, "grace_period": a.grace_period,
                    "reduction_factor": a.reduction_factor, "reference": "+".join(REFERENCE),
                    "target": float(reach["target"].iloc[0]),
                    "wall_seconds": round(time.time() - t0, 1), "argv": argv or sys.argv[1:]}, d / "replay.json")
        draw(anytime, reach, d / "replay.png", vars(a))

    write_folder(a.out, fill)
    cols = ["searcher", "scheduler", "reached", "median_epochs", "median_fraction", "fraction_ci95_low",
            "fraction_ci95_high", "final_iqm", "final_ci95_low", "final_ci95_high", "cpu_seconds_per_repeat"]
    print(reach.sort_values("median_fraction")[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{a.out}: runs/anytime/reach.parquet, replay.png ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from crackcore.cli import run_main

    sys.exit(run_main(main))
