"""The study's settings from the command line: the flags (made from the config dataclasses by
crackcore.flags), and their resolution over the experiment file into one StudyConfig.

Precedence: dataclass defaults < experiment file < its [cpu]/[gpu] profile < --smoke-test <
flags. Each profile is resolved once, into one validated StudyConfig."""
from __future__ import annotations

import argparse
import os
from operator import attrgetter
from pathlib import Path
from typing import Any

from crackcore.config import StudyConfig, TrainConfig, apply_overrides
from crackcore.exceptions import ConfigError
from crackcore.flags import add_flags, flag_values
from crackcore.sources import EMBEDDED_SAMPLE, SYNTHETIC, default_data

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = REPO / "experiments" / "study.toml"
DESCRIPTION = ("The tuning study: Optuna trials over learning rate, freezing depth and augmentation run by Ray Tune, "
               "the best setting retrained from scratch and evaluated, every output under STORAGE/STUDY-NAME.")
SMOKE = {"num_samples": 4, "max_epochs": 2, "grace_period": 1, "final_epochs": 2, "train.image_size": 32,
         "train.subset": 40, "train.synthetic_per_class": 60}
# the settings a flag of tune/run.py overrides: study keys, then [train] keys (the study's --seed is both)
STUDY_FLAGS = ["name", "num_samples", "max_epochs", "searcher", "scheduler", "grace_period", "reduction_factor",
               "final_epochs", "gpus_per_trial", "cpus_per_trial", "max_concurrent_trials", "reference_retrain", "seed",
               "repeat_top", "repeats", "compare_splits", "leave_one_out", "mlflow"]
TRAIN_FLAGS = ["data", "group_by", "val_source", "test_source", "adapt_to", "adapt_method", "adapt_prior", "external",
               "image_size", "subset", "weights", "split_strategy", "shift_suite"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune/run.py", description=DESCRIPTION)
    p.add_argument("--config", type=Path, default=DEFAULT_EXPERIMENT,
                   help=f"experiment TOML under experiments/ (default {DEFAULT_EXPERIMENT.relative_to(REPO)})")
    add_flags(p, StudyConfig, STUDY_FLAGS)
    add_flags(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--storage-path", default="results", help="local folder or URI (s3://, gs://) shared by all nodes "
                   "(default results)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="existing Ray cluster (host:port or auto); default $RAY_ADDRESS, else a local Ray")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue an interrupted study with this name; `--resume auto`: continue it if it exists and "
                   "is unfinished, start it if it does not, leave a finished one alone (a restarted driver pod)")
    p.add_argument("--smoke-test", action="store_true", help="tiny budget: 4 trials x 2 epochs at 32 px")
    p.add_argument("--trust-changed-state", action="store_true",
                   help="--resume a study whose saved Ray state (pickles: resuming runs them) changed since the study "
                   "wrote it; only for a study folder you trust")
    return p


def flag_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """The experiment-file overrides the flags give ({"max_epochs": 3, "train.image_size": 64, ...};
    None: not given). Data: --data, else default_data() (then the file's, then the embedded sample)."""
    flags = flag_values(a, STUDY_FLAGS) | {f"train.{k}": v for k, v in flag_values(a, TRAIN_FLAGS).items()}
    data = flags["train.data"] or default_data()
    if isinstance(data, str) and data != SYNTHETIC:  # one spelling, saved and compared on --resume (parse_sources resolves the others)
        data = str(Path(data).expanduser().resolve())
    return {**flags, "train.data": data, "train.seed": a.seed}


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line and its overrides of the experiment file, resolved once. Counts are
    checked here, before Ray starts, in the flags' own words."""
    a = build_parser().parse_args(argv)
    if a.resume not in (False, True, "auto"):
        raise ConfigError(f"--resume takes no value, or 'auto' (got {a.resume!r})")
    for name in ("num_samples", "max_epochs", "final_epochs", "image_size", "subset"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    return a, flag_overrides(a)


def resume_conflicts(a: argparse.Namespace, cfg: StudyConfig, saved: StudyConfig,
                     flags: dict[str, Any] | None = None, from_file: StudyConfig | None = None) -> list[str]:
    """Flags given with --resume that disagree with the saved study: a resumed study keeps its
    settings, so such a flag would be silently ignored (the experiment file is not re-read). A
    --config file given with --resume counts as flags: each setting it makes (`from_file`)."""
    wanted = {k: v for k, v in (flags or flag_overrides(a)).items() if v is not None and k != "name"}
    if a.data is None:
        wanted.pop("train.data", None)  # $CRACK_DATA or the download folder, not the user's words now
    if a.smoke_test:
        wanted = {**{k: attrgetter(k)(cfg) for k in SMOKE}, **wanted}
    conflicts = [f"{k} is {attrgetter(k)(saved)!r} there, not {v!r}" for k, v in sorted(wanted.items())
                 if attrgetter(k)(saved) != v]
    if from_file is not None and a.config != DEFAULT_EXPERIMENT:
        # the file given now: what it sets (top level or in a profile) must be the study's setting too
        file, default = _flat(from_file.to_dict()), _flat(StudyConfig().to_dict())
        sets = {k for k in file if k not in PROFILES and file[k] != default.get(k)}
        sets |= {k for p in PROFILES for k in getattr(from_file, p) or {}}
        now, then = _flat(cfg.to_dict()), _flat(saved.to_dict())
        conflicts += [f"{k} is {then.get(k)!r} there, not {now.get(k)!r} (--config {a.config})"
                      for k in sorted(sets - {"name", *wanted}) if k in now and now[k] != then.get(k)]
    return conflicts


PROFILES = ("cpu", "gpu")  # StudyConfig's per-hardware overrides, already in the form "train.subset"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"subset": 40}} as {"train.subset": 40}; the profiles stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in PROFILES else {f"{prefix}{k}": v})
    return out


def resolve_config(a: argparse.Namespace, from_file: StudyConfig, has_gpu: bool,
                   flags: dict[str, Any] | None = None) -> StudyConfig:
    """The study's config on a cluster with (or without) GPUs: the file's profile, --smoke-test and
    the flags (`flags`: flag_overrides(a)) gathered first, then applied and validated once. With
    GPUs and no gpus_per_trial from file or flag, trials pack 4 per GPU."""
    changes = dict(from_file.gpu if has_gpu else from_file.cpu)

    def value(key: str) -> Any:  # the setting as the changes so far leave it
        return changes[key] if key in changes else attrgetter(key)(from_file)

    if a.smoke_test:
        changes.update({**SMOKE, "num_samples": min(value("num_samples"), SMOKE["num_samples"])})
    flags = {k: v for k, v in (flags or flag_overrides(a)).items() if v is not None}
    if "max_epochs" in flags and "grace_period" not in flags:
        flags["grace_period"] = min(value("grace_period"), flags["max_epochs"])
    changes.update(flags)
    if value("train.data") is None:  # nothing from flags, $CRACK_DATA, the download folder or the file
        changes["train.data"] = str(EMBEDDED_SAMPLE)
    if not has_gpu:  # a --gpus-per-trial is ignored (tune.run says so)
        changes["gpus_per_trial"] = 0.0
    elif value("gpus_per_trial") is None:  # set nowhere; an explicit 0 (file or flag) keeps trials on CPUs
        changes["gpus_per_trial"] = 0.25
    return apply_overrides(from_file, changes)
