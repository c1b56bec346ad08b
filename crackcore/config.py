"""Run configuration as plain data: one dataclass per kind of run, loadable from TOML,
printed at start and saved as JSON next to every result."""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from crackcore.exceptions import ConfigError

AUGMENT_POLICIES = ("none", "flip", "flip_rotate", "color", "strong", "scale", "photometric", "domain")
METRICS = ("val_acc", "val_shift_acc")  # what ASHA, Optuna and the choice of the best trial maximise
FREEZE_DEPTHS = tuple(range(6))  # stages frozen: 0 = fine-tune all .. 5 = head only
SPLIT_STRATEGIES = ("random", "grouped")
LR_SCHEDULES = ("cosine", "constant")
ADAPT_METHODS = ("bn", "tent", "self-train")  # crackcore.adaptation; bn is the one measured to help
SEARCHERS = ("tpe", "random", "qmc", "gp", "cmaes")  # Optuna samplers behind Ray's OptunaSearch (tune.search)
SCHEDULERS = ("asha", "hyperband", "median", "fifo")  # Ray's schedulers; hyperband = asynchronous (ASHA's brackets)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # of a study or a data source: a folder name


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, choices: tuple | None = None,
            metavar: str | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line flag (crackcore.flags builds it): its help,
    and the flag's name, choices and metavar where they are not the field's own."""
    meta = {"help": help, **{k: v for k, v in (("flag", flag), ("choices", choices), ("metavar", metavar)) if v}}
    return field(default=default, default_factory=default_factory, metadata=meta)


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    """The one check of a value that must be one of a fixed set (policy, depth, strategy)."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is unknown; use one of {', '.join(map(str, allowed))}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if isinstance(value, bool) and hint in (int, float):  # True is an int to Python, not a size or a rate
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0] if args else Any) for v in value)
    return isinstance(value, origin or hint)  # dict[str, Any] -> dict; NoneType, bool, int, str as they are


def check_types(obj: Any, where: str) -> None:
    """TOML and JSON give strings, numbers and booleans as written: "227" or "no" must not pass
    as an image size or as True. A value of the wrong type, or outside a setting's `choices`,
    is a ConfigError naming the key."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a NumPy/torch scalar from an API caller
            value = value.item()
            setattr(obj, f.name, value)
        if not _type_ok(value, hints[f.name]):
            hint = hints[f.name]
            want = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("NoneType", "None")
            raise ConfigError(f"[{where}] {f.name} = {value!r} has the wrong type; expected {want}")
        if "choices" in f.metadata:
            check_choice(f.name, value, f.metadata["choices"])


@dataclass
class TrainConfig:
    """Everything one training run (a trial, the final retrain, the baseline) depends on."""

    # data
    data: str | dict[str, str] | None = setting(
        None, metavar="[NAME=]PATH", help="a crack/no-crack folder, repeatable for several sources (NAME=PATH), or "
        "`synthetic` (default $CRACK_DATA, then data/concrete-crack-images, else the embedded real sample)")
    group_by: str | None = setting(None, help="regex: file names with the same first capture group (one photo) share "
                                   "a split, e.g. '^(.*)__' for PHOTO__rYcX.jpg windows")
    val_source: str | None = setting(None, help="a --data source never trained on: trials and the best trial are "
                                     "scored on all of its images")
    test_source: str | None = setting(None, help="a --data source used only for the final evaluation")
    adapt_to: str | None = setting(None, help="the held-out source (--val-source or --test-source) to score adapted "
                                   "to its own unlabelled images (crackcore.adaptation): the val source every epoch, "
                                   "so trials are selected on the adapted score; the final evaluation reports every "
                                   "held-out source and --eval set zero-shot and adapted")
    adapt_method: str = setting("bn", choices=ADAPT_METHODS, help="how --adapt-to adapts: bn (BN statistics "
                                "re-estimated), tent or self-train")
    adapt_prior: bool = setting(True, help="after --adapt-method, shift the decision for the site's crack prior "
                                "estimated by EM; --no-adapt-prior skips it (EM can run away on an overconfident model)")
    external: dict[str, str] = setting(flag="--eval", metavar="NAME=PATH", default_factory=dict,
                                       help="a labelled folder the final model is evaluated on (repeatable)")
    image_size: int = setting(64, help="images are decoded to this square size in px (native 227)")
    subset: int | None = setting(None, help="images per class, per source (deterministic by hash); default all")
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    split_strategy: str = setting("random", choices=SPLIT_STRATEGIES,
                                  help="`grouped` also keeps near-duplicate groups in one split")
    split_seed: int = 0
    synthetic_per_class: int = 400  # size of the procedural synthetic set (data None or "synthetic")
    # model
    weights: str = setting("auto", help="auto | imagenet | random | PATH to resnet18-f37072fd.pth")
    freeze_depth: int = setting(0, choices=FREEZE_DEPTHS, help="ResNet stages frozen: 0 = fine-tune all .. 5 = head only")
    # optimisation
    lr: float = setting(0.01, help="peak learning rate (SGD, Nesterov momentum)")
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = setting(64, help="training batch size")
    epochs: int = setting(10, help="training epochs")
    lr_schedule: str = setting("cosine", choices=LR_SCHEDULES, help="after a 3 %% warm-up: cosine to zero, or constant")
    augment_policy: str = setting("flip", choices=AUGMENT_POLICIES, help="augmentation policy (crackcore.augment)")
    label_smoothing: float = 0.0
    # execution
    seed: int = setting(0, help="the training seed (weights init, batch order, augmentation)")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N | mps")
    num_threads: int | None = None  # torch CPU threads; None = CPUs this process may use
    amp: bool = True  # train under autocast where the device runs it natively (train.autocast_dtype)
    channels_last: bool = True  # faster on CUDA and on oneDNN CPUs alike
    compile: bool = False  # torch.compile the model (CUDA; measured in crackcore.bench)
    gpu_share: float = 1.0  # of the GPU's memory this run may plan for (a packed trial: its gpus_per_trial)
    # shift suite (crackcore.shift): the test split under camera / site shifts after training
    shift_suite: bool = setting(True, help="score the test split under the shift suite after training "
                                "(final_metrics.json 'shift'); --no-shift-suite skips it")
    shift_max_images: int | None = setting(500, help="test images scored per shift cell (a stratified seeded "
                                           "subset); 0 = all")
    val_shift: bool = setting(False, help="also score val under the cheap shifts (shift.VAL_CELLS) every epoch "
                              "(history: val_shift_acc)")

    def __post_init__(self) -> None:
        check_types(self, "train")
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # TOML gives lists
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image_size={self.image_size} is out of range; use 16..1024 (native 227)")
        if not (self.lr > 0 and self.batch_size > 0 and self.epochs > 0):
            raise ConfigError("lr, batch_size and epochs must be positive")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) <= 0:
            raise ConfigError(f"split_fractions={self.split_fractions} must be three positive numbers summing to 1")
        if self.subset is not None and self.subset < 2:
            raise ConfigError(f"subset={self.subset} must be at least 2 images per class")
        if not 0 < self.gpu_share <= 1:
            raise ConfigError(f"gpu_share={self.gpu_share} must be in (0, 1]")
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0 and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"momentum={self.momentum} and label_smoothing={self.label_smoothing} must be in [0, 1), "
                              f"weight_decay={self.weight_decay} >= 0")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
        if self.synthetic_per_class < 2 or (self.num_threads is not None and self.num_threads < 1):
            raise ConfigError("synthetic_per_class must be >= 2 and num_threads >= 1 (or unset)")
        if self.seed < 0 or self.split_seed < 0:
            raise ConfigError(f"seed={self.seed} and split_seed={self.split_seed} must be >= 0")
        if self.shift_max_images is not None and self.shift_max_images < 2:
            raise ConfigError(f"shift_max_images={self.shift_max_images} must be >= 2 (or unset: every test image)")
        for name, path in [*(self.data.items() if isinstance(self.data, dict) else []), *self.external.items()]:
            if not NAME.fullmatch(name) or not path or not isinstance(path, str):
                raise ConfigError(f"data source {name!r} = {path!r}: a source needs a folder name (letters, digits, "
                                  "'.', '_', '-') and a path; write NAME=PATH")
        if isinstance(self.data, dict) and not self.data:
            raise ConfigError("data = {} names no source; give at least one NAME=PATH")
        if self.group_by is not None:
            try:
                groups = re.compile(self.group_by).groups
            except re.error as exc:
                raise ConfigError(f"group_by={self.group_by!r} is not a regular expression ({exc})") from None
            if groups < 1:
                raise ConfigError(f"group_by={self.group_by!r} has no capture group; mark the photo part of the file "
                                  "name, e.g. '^(.*)__'")

    def check_sources(self) -> None:
        """The roles fit the sources. Checked where the data is prepared (and by the study before Ray
        starts), not when an experiment file is read: its sources may come from --data flags."""
        names = list(self.sources())
        if set(self.external) & set(names):
            raise ConfigError(f"--eval name(s) {sorted(set(self.external) & set(names))} are data sources already; "
                              "name the external set differently (--eval NAME=PATH)")
        for key in ("val_source", "test_source"):
            if getattr(self, key) is not None and getattr(self, key) not in names:
                raise ConfigError(f"{key}={getattr(self, key)!r} names no data source; the sources are "
                                  f"{', '.join(names)} (name them with --data NAME=PATH)")
        if self.val_source is not None and self.val_source == self.test_source:
            raise ConfigError(f"val_source and test_source are both {self.val_source!r}; a source is either scored "
                              "for selection or kept for the final evaluation, not both")
        if self.adapt_to is not None and self.adapt_to not in self.held_out():
            raise ConfigError(f"adapt_to={self.adapt_to!r} is not a held-out source (held out: "
                              f"{', '.join(sorted(self.held_out())) or 'none'}); name the --val-source or --test-source "
                              "to adapt to, or drop --adapt-to")
        if not set(names) - {self.val_source, self.test_source}:
            raise ConfigError(f"held out {', '.join(n for n in names)}, the only source(s) there are: nothing is "
                              "left to train on; add a training source with --data NAME=PATH")

    def sources(self) -> dict[str, str | None]:
        """{name: folder} of the training data: a bare folder is named after itself, no data at all is
        the synthetic set (folder None)."""
        if isinstance(self.data, dict):
            return dict(self.data)
        return {Path(self.data).expanduser().resolve().name: self.data} if self.data else {"synthetic": None}

    def held_out(self) -> set[str]:
        return {s for s in (self.val_source, self.test_source) if s is not None}

    def selection_sources(self) -> list[str] | None:
        """The sources whose val rows trials are scored on: the held-out val source alone, or all (None)."""
        return [self.val_source] if self.val_source else None

    def selection(self) -> str:
        """What trials and the best trial are scored on, in words."""
        if self.val_source:
            return f"all of source {self.val_source!r} (never trained on)"
        return f"the val split of {', '.join(s for s in self.sources() if s not in self.held_out())}"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def leave_one_out(cfg: TrainConfig) -> dict[str, TrainConfig]:
    """Per source, the same setting trained on every other source and scored on all of that one:
    the standard table of domain-generalisation work."""
    if len(cfg.sources()) < 2:
        raise ConfigError("leave-one-out needs at least two data sources; give them as --data NAME=PATH")
    return {name: cfg.replace(val_source=None, test_source=name, external={}, adapt_to=name if cfg.adapt_to else None)
            for name in cfg.sources()}


@dataclass(frozen=True)
class TrialParams:
    """What the search decides for one trial: the one form a trial's settings take from the
    sampler through Ray to the optimizer, and into the repeats and the final retrain. A key
    left None is not searched and keeps the study's [train] value."""

    # Each searched key is declared here once: its kind and the [space] keys that bound it (a list
    # left empty there is not searched); tune.search builds the distributions from this, and
    # load_study_config keeps [train] from setting what the search decides.
    lr: float = field(metadata={"kind": "log-uniform", "space": ("lr_min", "lr_max")})
    freeze_depth: int = field(metadata={"kind": "ordinal", "space": ("freeze_depths",)})
    augment_policy: str = field(metadata={"kind": "categorical", "space": ("augment_policies",)})
    weight_decay: float | None = field(default=None, metadata={"kind": "categorical", "space": ("weight_decays",)})
    batch_size: int | None = field(default=None, metadata={"kind": "categorical", "space": ("batch_sizes",)})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


SEARCH_KEYS = tuple(f.name for f in fields(TrialParams))


def trial_config(train: TrainConfig, params: TrialParams, epochs: int) -> TrainConfig:
    """The training config of a trial, a repeat or the retrain: the study's [train] settings,
    the searched values and the epoch budget (validated as any TrainConfig)."""
    return train.replace(**params.to_dict(), epochs=epochs)


@dataclass
class SearchSpace:
    lr_min: float = 1e-4
    lr_max: float = 1e-1
    freeze_depths: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    augment_policies: list[str] = field(default_factory=lambda: list(AUGMENT_POLICIES))
    weight_decays: list[float] = field(default_factory=list)  # empty = not searched
    batch_sizes: list[int] = field(default_factory=list)  # empty = not searched
    # With random init (no ImageNet weights) freezing depth > 0 freezes random layers: the study then
    # searches depth 0 only, unless this is true (tune.run.narrow_for_random_init).
    freeze_random_init: bool = False
    # The seed notebook's setting, evaluated first so the study always beats (or matches) it.
    start_points: list[dict[str, Any]] = field(
        default_factory=lambda: [{"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"}])

    def searched(self) -> dict[str, tuple[str, list[Any]]]:
        """{key: (kind, its [space] values)} of every TrialParams key this space searches."""
        found = {}
        for f in fields(TrialParams):
            values = [getattr(self, key) for key in f.metadata["space"]]
            if all(v not in (None, []) for v in values):
                found[f.name] = (f.metadata["kind"], values)
        return found

    def __post_init__(self) -> None:
        check_types(self, "space")
        if not self.freeze_depths or not self.augment_policies:
            raise ConfigError("space.freeze_depths and space.augment_policies need at least one value each")
        for p in self.augment_policies:
            check_choice("space.augment_policies", p, AUGMENT_POLICIES)
        for d in self.freeze_depths:
            check_choice("space.freeze_depths", d, FREEZE_DEPTHS)
        if not 0 < self.lr_min < self.lr_max:
            raise ConfigError("space.lr_min must be > 0 and < space.lr_max")
        if any(w < 0 for w in self.weight_decays) or any(b < 2 for b in self.batch_sizes):
            raise ConfigError("space.weight_decays must be >= 0 and space.batch_sizes >= 2")
        for point in self.start_points:
            unknown = sorted(set(point) - set(SEARCH_KEYS))
            if unknown:
                raise ConfigError(f"space.start_points has unknown key(s) {unknown}; use {', '.join(SEARCH_KEYS)}")

    def outside(self, point: dict[str, Any]) -> str:
        """What of `point` (a setting: lr, freeze_depth, ...) this space cannot express; "" when it can."""
        unknown = sorted(set(point) - set(SEARCH_KEYS))
        if unknown:
            return f"unknown key(s) {unknown}; use {', '.join(SEARCH_KEYS)}"
        checks = {"lr": lambda v: isinstance(v, (int, float)) and self.lr_min <= v <= self.lr_max,
                  "freeze_depth": lambda v: v in self.freeze_depths,
                  "augment_policy": lambda v: v in self.augment_policies,
                  "weight_decay": lambda v: not self.weight_decays or v in self.weight_decays,
                  "batch_size": lambda v: not self.batch_sizes or v in self.batch_sizes}
        return ", ".join(f"{k} = {v!r}" for k, v in point.items() if not checks[k](v))


@dataclass
class StudyConfig:
    name: str = setting("study", flag="--study-name", help="results go to STORAGE/STUDY-NAME")
    num_samples: int = setting(32, help="number of trials")
    metric: str = "val_acc"
    max_epochs: int = setting(4, help="epochs of a trial that is never stopped early (the scheduler's max_t)")
    searcher: str = setting("tpe", choices=SEARCHERS, help="Optuna sampler behind Ray's OptunaSearch")
    scheduler: str = setting("auto", choices=("auto", *SCHEDULERS), help="Ray scheduler that stops trials early (fifo: "
                             "none; auto: fifo with --val-source, else asha)")
    grace_period: int = setting(1, help="the first epoch a scheduler may stop a trial at")
    reduction_factor: int = setting(3, help="asha / hyperband keep 1/reduction_factor of the trials at each rung")
    final_epochs: int = setting(10, help="epochs of the final retrain")
    seed: int = setting(0, help="the seed of the search and of the training")
    cpus_per_trial: float = setting(1.0, help="CPUs each trial holds")
    gpus_per_trial: float | None = setting(None, help="GPUs each trial holds; a fraction packs trials per GPU, e.g. "
                                           "0.25 = 4 per GPU (default 0.25 with GPUs; 0 keeps trials on CPUs)")
    max_concurrent_trials: int | None = setting(None, help="trials at once; default as many as the resources allow")
    max_failures: int = 2
    repeat_top: int = setting(0, help="re-run the top K configs with --repeats seeds and pick by the mean")
    repeats: int = setting(3, help="seeds per config with --repeat-top")
    compare_splits: bool = setting(False, help="also retrain the best config under the other split strategy")
    leave_one_out: bool = setting(False, help="retrain the chosen setting once per source with that source held "
                                  "out (loso.parquet)")
    checkpoint_every: int = 1  # epochs between a trial's checkpoints, bar rungs and the last (tune.search.checkpoint_epochs)
    mlflow: str | None = setting(None, metavar="URI", help="record every trial and the final retrain as MLflow runs "
                                 "of an experiment named after the study (or --out's folder), e.g. "
                                 "sqlite:///results/mlflow.db")
    # The setting tuning must beat, retrained beside the pick (final_metrics.json "lift"); None: the
    # first of space.start_points. Keys it leaves out take the [train] value.
    reference: dict[str, Any] | None = None
    reference_retrain: bool = setting(True, flag="--reference", help="retrain the reference setting beside the pick "
                                      "and measure the lift over it; --no-reference skips it")
    # Overrides applied when the cluster has no GPU / has GPUs, as {"dotted.key": value}:
    # budgets adapt to the device without a second experiment file.
    cpu: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self) -> None:
        for key, cls in (("train", TrainConfig), ("space", SearchSpace)):
            if isinstance(getattr(self, key), dict):
                setattr(self, key, _from_dict(cls, getattr(self, key), key))
            elif not isinstance(getattr(self, key), cls):
                raise ConfigError(f"[{key}] must be a table of settings, not {getattr(self, key)!r}")
        check_types(self, "study")
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"study name {self.name!r} is not a folder name; use letters, digits, '.', '_', '-' "
                              "(starting with a letter or digit)")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 1")
        if not 1 <= self.grace_period <= self.max_epochs:
            raise ConfigError(f"grace_period={self.grace_period} must be between 1 and max_epochs={self.max_epochs}")
        if self.cpus_per_trial <= 0 or (self.gpus_per_trial or 0) < 0:
            raise ConfigError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if (self.gpus_per_trial or 0) > 1 and not float(self.gpus_per_trial).is_integer():
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial}: above 1 Ray needs whole GPUs; use e.g. 0.5, 1 or 2")
        check_choice("metric", self.metric, METRICS)
        if self.searcher == "cmaes":
            self._check_cmaes_space()
        if self.metric == "val_shift_acc":  # every trial scores val under the cheap shifts at each epoch
            self.train = self.train.replace(val_shift=True)
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor={self.reduction_factor} must be >= 2 (ASHA keeps 1/reduction_factor)")
        if self.final_epochs < 1 or self.max_failures < 0 or self.repeat_top < 0 or self.repeats < 0:
            raise ConfigError("final_epochs must be >= 1, and max_failures, repeat_top, repeats >= 0")
        if self.repeat_top > self.num_samples:
            raise ConfigError(f"repeat_top={self.repeat_top} is more than the num_samples={self.num_samples} trials the "
                              "study runs; lower --repeat-top (it re-runs at most that many settings of the tie set)")
        if self.repeat_top > 0 and self.repeats < 2:
            raise ConfigError(f"repeats={self.repeats}: ranking by the mean over seeds needs at least 2 seeds")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 1 (epochs between checkpoints)")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1 (or unset)")
        if self.reference is not None:
            outside = self.space.outside(self.reference)
            if outside:
                raise ConfigError(f"reference = {self.reference} is outside the search space ({outside}); put it "
                                  "inside [space] or widen [space], as the study must be able to pick it")

    @property
    def scheduler_used(self) -> str:
        """The scheduler the search runs. `auto`: FIFO when trials are chosen on a held-out source
        (train.val_source), where masonry accuracy at epoch 1 did not predict epoch 4 and every
        early-stopping scheduler replayed stopped the eventual winners (README, tune.replay); else ASHA."""
        if self.scheduler != "auto":
            return self.scheduler
        return "fifo" if self.train.val_source else "asha"

    def reference_params(self) -> "TrialParams":
        """The reference setting as a trial's params: `reference`, else the first start point, its
        unset keys (and those the space does not search) from [train]."""
        point = self.reference if self.reference is not None else (self.space.start_points or [{}])[0]
        searched = {"weight_decay": bool(self.space.weight_decays), "batch_size": bool(self.space.batch_sizes)}
        return TrialParams(**{k: point.get(k, getattr(self.train, k)) for k in SEARCH_KEYS if searched.get(k, True)})

    def _check_cmaes_space(self) -> None:
        """Optuna's CMA-ES models numbers only, in two dimensions or more: anything else it hands,
        silently, to random sampling, so such a study would be a random search under another name."""
        s = self.space
        categorical = [k for k, values in (("augment_policy", s.augment_policies), ("weight_decay", s.weight_decays),
                                           ("batch_size", s.batch_sizes)) if len(values) > 1]
        depths = sorted(set(s.freeze_depths))
        numeric = 1 + (len(depths) > 1)  # lr, and freeze depth when it varies
        if depths != list(range(depths[0], depths[-1] + 1)) and len(depths) > 1:
            categorical.append("freeze_depth")  # not a contiguous range: searched as a categorical
            numeric = 1
        if categorical or numeric < 2:
            why = f"{', '.join(categorical)} {'is' if len(categorical) == 1 else 'are'} categorical" if categorical \
                else "only lr varies (CMA-ES needs two numeric parameters or more)"
            raise ConfigError(f"searcher=cmaes cannot search this space: {why}; use --searcher tpe or gp, or give "
                              "one value each in space.augment_policies / weight_decays / batch_sizes and a range "
                              "of space.freeze_depths")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(cfg: StudyConfig, overrides: dict[str, Any]) -> StudyConfig:
    """Return a copy with {"max_epochs": 3, "train.image_size": 64, ...} applied and re-validated."""
    values = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        target = values
        for part in parents:
            if part not in ("train", "space") or part not in target:
                raise ConfigError(f"unknown setting {key!r}; use a study key, train.<key> or space.<key>")
            target = target[part]
        if leaf not in target:
            raise ConfigError(f"unknown setting {key!r}; known: {sorted(target)}")
        target[leaf] = value
    return _from_dict(StudyConfig, values, "overrides")


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known keys: {sorted(known)}")
    return cls(**values)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read an experiment TOML: top-level study keys, a [train] table and a [space] table."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist; pass --config experiments/<name>.toml")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    values.pop("description", None)
    train, space = values.setdefault("train", {}), values.get("space", {})
    profiles = [values[name] for name in ("cpu", "gpu") if isinstance(values.get(name), dict)]
    if isinstance(train, dict) and isinstance(space, dict):  # other types: StudyConfig says "must be a table"
        if "seed" in values and "seed" not in train:  # as --seed: one seed for the search and the training
            train["seed"] = values["seed"]
        decided = {*_from_dict(SearchSpace, space, "space").searched(), "epochs"}
        for key in [*train, *(k.removeprefix("train.") for profile in profiles for k in profile)]:
            if key in decided:
                raise ConfigError(f"{path}: [train] {key} is set by the study, not the file: "
                                  + ("use max_epochs / final_epochs" if key == "epochs" else
                                     "the search chooses it (bound it in [space], or give a space.start_points entry)"))
    for profile in profiles:
        if "name" in profile:  # the study's folder is found before Ray says which profile applies
            raise ConfigError(f"{path}: a [cpu]/[gpu] profile sets name; set it once at the top of the file")
    cfg = _from_dict(StudyConfig, values, path.name)
    for profile in ("cpu", "gpu"):  # both, whichever device this run has: a typo fails on every machine
        try:
            apply_overrides(cfg, getattr(cfg, profile))
        except ConfigError as exc:
            raise ConfigError(f"{path} [{profile}]: {exc}") from None
    return cfg


def config_json(cfg: TrainConfig | StudyConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
