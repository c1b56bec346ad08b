"""The crack dataset: discover files, group byte-identical copies, split deterministically,
decode once into a uint8 cache, and serve batches.

Data flows one way: files -> samples table (with split) -> uint8 image array -> batches.
The samples table is what `split.parquet` holds; nothing downstream re-derives it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from crackcore.augment import batch_augment, per_image_transform
from crackcore.config import TrainConfig
from crackcore.exceptions import DataError, storage_error
from crackcore.hashing import content_digest, unit_hash
from crackcore.images import CACHE_ENV, CLASSES, IMAGENET_MEAN, IMAGENET_STD, cache_dir, decode_file, io_workers
from crackcore.neardup import group_report, near_duplicate_groups
from crackcore.progress import track
from crackcore.sources import EMBEDDED_CITATION, EMBEDDED_SAMPLE, SYNTHETIC, discover
from crackcore.synthetic import default_synthetic_root, make_synthetic_dataset

SPLITS = ("train", "val", "test")  # and "external": --eval folders, evaluated after training only
CACHE_VERSION = 2  # 2: 16-bit images scaled to 8 bits (1 wrapped them)


def _warn(msg: str) -> None:
    print(f"[crackcore.data] WARNING: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- hashing and splits


def add_content_hashes(root: Path, samples: pd.DataFrame) -> pd.DataFrame:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return samples.assign(content_hash=list(pool.map(lambda rel: content_digest(root / rel), samples["path"])))


def assign_splits(samples: pd.DataFrame, fractions: tuple[float, float, float], seed: int,
                  group_column: str = "group") -> pd.Series:
    """Split by a hash of (group key, seed). The group key is the content hash (or the near-
    duplicate group), so byte-identical copies share a split, and adding files never moves an
    existing one. The same thresholds apply to both classes, so the split is stratified in
    expectation (exactly, up to hash noise)."""
    u = samples[group_column].map(lambda g: unit_hash(seed, g))
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    return pd.Series(np.where(u < cut_train, "train", np.where(u < cut_val, "val", "test")), index=samples.index)


def select_subset(samples: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """The `per_class` images per class of each source with the smallest hash(group, seed):
    stable and duplicates-together."""
    ranked = samples.assign(_u=samples["group"].map(lambda g: unit_hash(seed + 7919, g)))
    ranked = ranked.sort_values(["label", "_u", "path"])
    chosen = ranked.groupby(["source", "label"], group_keys=False).head(per_class).drop(columns="_u")
    return chosen.sort_values(["source", "path"], kind="stable")


def _cache_key(samples: pd.DataFrame, image_size: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"v{CACHE_VERSION}:{image_size}:".encode())
    for digest, rel in zip(samples["content_hash"], samples["path"]):
        h.update(f"{digest}:{Path(rel).suffix.lower()};".encode())
    return h.hexdigest()


def load_images(files: list[Path], samples: pd.DataFrame, image_size: int,
                progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """Decode every sample (`files`, row by row) once into a memory-mapped uint8 [N, 3, S, S] file keyed by the
    files' content and the size, so every later run (and every trial on the node) reads the
    page-cached array instead of decoding JPEGs. Returns the array and {row: error} for
    files that could not be decoded (their rows hold zeros and must be dropped)."""
    key = _cache_key(samples, image_size)
    folder = cache_dir() / "images"
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if array_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return np.load(array_path, mmap_mode="r"), {int(k): v for k, v in meta["bad"].items()}

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
    meta_tmp = meta_path.with_suffix(f".{os.getpid()}.tmp")
    try:
        bad = _decode_into(tmp, files, image_size, progress)
        meta_tmp.write_text(json.dumps({"n": len(samples), "image_size": image_size, "bad": bad}))
        os.replace(tmp, array_path)  # array first: the meta file marks a complete cache
        os.replace(meta_tmp, meta_path)
    except BaseException as exc:  # Ctrl-C or a full disk must not leave a dataset-sized temp file behind
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
        size = len(files) * 3 * image_size**2
        line = storage_error(exc, f"the decode cache: {len(files)} images at {image_size} px, {size / 1e6:.0f} MB",
                             f"free space there, or set {CACHE_ENV} to a folder with room", array_path)
        if line is None:
            raise
        raise line from None
    return np.load(array_path, mmap_mode="r"), bad


def _decode_into(tmp: Path, paths: list[Path], image_size: int, progress: bool) -> dict[int, str]:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, image_size, image_size))
    # the mapped file is sparse: on a full disk the first write to a page kills the process with
    # SIGBUS. Claiming its blocks now turns that into an ENOSPC here.
    with open(tmp, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    bad: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out[i] = decode_file(paths[i], image_size).numpy()
        except Exception as exc:  # any decoder failure = unusable file, never a crash mid-epoch
            bad[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"

    with ThreadPoolExecutor(max_workers=io_workers()) as pool:
        list(track(pool.map(work, range(len(paths))), f"decode {image_size}px", len(paths), unit="images",
                   enabled=progress))
    out.flush()  # the mapping itself closes when `out` goes out of scope, before the caller renames the file
    return bad


# --------------------------------------------------------------------------- prepared data


@dataclass
class PreparedData:
    """Samples table (one row per usable image, index = position in `images`) plus the
    decoded uint8 images and a description of where they came from."""

    samples: pd.DataFrame  # source, path, file, label, bytes, content_hash, group, split
    images: np.ndarray  # uint8 [N, 3, S, S]
    image_size: int
    source: dict[str, Any] = field(default_factory=dict)

    def indices(self, split: str, sources: list[str] | None = None) -> np.ndarray:
        """Rows of a split, of some sources only if given."""
        if split not in (*SPLITS, "external"):
            raise ValueError(f"split must be one of {SPLITS} or external")
        mask = self.samples["split"].to_numpy() == split
        return np.flatnonzero(mask if sources is None else mask & self.samples["source"].isin(sources).to_numpy())

    def roles(self, role: str) -> list[str] | None:
        """The sources whose role is train (split 70/15/15), val, test or external; None: all rows."""
        if "sources" not in self.source:
            return None
        return [n for n, r in self.source["sources"].items() if r["role"] == role]

    def split_table(self) -> pd.DataFrame:
        """What `split.parquet` holds: one row per image, `sample` = row in `images`."""
        t = self.samples.reset_index(drop=True)
        return t.assign(sample=np.arange(len(t)), class_name=t["label"].map(dict(enumerate(CLASSES))))[
            ["sample", "path", "label", "class_name", "split", "group", "content_hash", "bytes", "source"]]

    def counts(self) -> dict[str, dict[str, int]]:
        tab = self.samples.groupby(["split", "label"]).size()
        splits = [*SPLITS, *(["external"] if (self.samples["split"] == "external").any() else [])]
        return {s: {CLASSES[l]: int(tab.get((s, l), 0)) for l in (0, 1)} for s in splits}


def resolve_data_root(data: str | None, synthetic_per_class: int, seed: int) -> tuple[Path, str]:
    """`data` if given (the embedded real sample is named as such), else (None or `synthetic`)
    the procedural synthetic set (generated once, cached). Returns (root, kind) where kind is
    "real" or "synthetic"."""
    if data and data != SYNTHETIC:
        root = Path(data).expanduser()
        if root.resolve() == EMBEDDED_SAMPLE:
            n = sum(1 for p in root.glob("*/*") if p.suffix.lower() == ".jpg")
            print(f"data: embedded real sample: {n} images, {EMBEDDED_CITATION} ({root}); pass --data PATH for "
                  "your own or the full set (python -m crackcore.download --to data/)", file=sys.stderr, flush=True)
        return root, "synthetic" if (root / "SYNTHETIC.json").exists() else "real"
    # Generated at 227 px like the real patches; the working size is applied by the decoder.
    root = make_synthetic_dataset(default_synthetic_root(synthetic_per_class, 227, seed), synthetic_per_class, 227, seed)
    print("=" * 78 + f"\n!! SYNTHETIC crack set ({synthetic_per_class}/class) at {root}\n"
          "!! Numbers from it say nothing about real concrete. Without --data the real embedded sample is used.\n"
          + "=" * 78, file=sys.stderr, flush=True)
    return root, "synthetic"


def photo_groups(samples: pd.DataFrame, pattern: str) -> pd.Series:
    """`group` merged with --group-by: images whose file names give the same first capture group
    (the windows of one photo) join one group, transitively with near-duplicate groups, so no
    photo straddles two splits. The merged key is the smallest group key of its members."""
    names = samples["path"].map(lambda p: Path(p).name)
    photo = names.str.extract(pattern, expand=True).iloc[:, 0]  # re.search, as Python's re does
    matched = int(photo.notna().sum())
    if matched == 0:
        raise DataError(f"--group-by {pattern!r} matches none of the {len(names)} file names (e.g. {names.iloc[0]}); "
                        "fix the regex, e.g. '^(.*)__' for PHOTO__rYcX.jpg windows")
    if matched < len(names):
        _warn(f"--group-by {pattern!r} matched {matched} of {len(names)} file names; the others keep their own groups")
    photo = (samples["source"] + "/" + photo).fillna(samples["group"])
    g, p = pd.factorize(samples["group"])[0], pd.factorize(photo)[0]
    n = len(samples)
    # nodes: images, then group keys, then photo keys; an image links its group and its photo
    edges = np.r_[np.arange(n), np.arange(n)], np.r_[n + g, n + g.max() + 1 + p]
    size = n + g.max() + p.max() + 2
    _, component = connected_components(coo_matrix((np.ones(2 * n), edges), shape=(size, size)), directed=False)
    return samples["group"].groupby(component[:n]).transform("min")


def _source_files(name: str, path: str | None, cfg: TrainConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One source's files (with their `source` and absolute `file`) and what was found there."""
    root, kind = resolve_data_root(path, cfg.synthetic_per_class, cfg.seed)
    samples, skipped = discover(root)
    samples = add_content_hashes(root, samples).assign(source=name, file=[str(root / p) for p in samples["path"]])
    role = ("external" if name in cfg.external else "val" if name == cfg.val_source else
            "test" if name == cfg.test_source else "train")
    return samples, {"kind": kind, "root": str(root.resolve()), "role": role, "files": len(samples), **skipped}


def prepare_data(cfg: TrainConfig, progress: bool = True) -> PreparedData:
    """Every source (and --eval folder) listed, hashed, grouped, split and decoded into one array.
    A held-out source's images are all val (val_source) or all test (test_source), an --eval
    folder's all external: never in train."""
    cfg.check_sources()
    found = {name: _source_files(name, path, cfg) for name, path in {**cfg.sources(), **cfg.external}.items()}
    samples = pd.concat([rows for rows, _ in found.values()], ignore_index=True)
    records = {name: record for name, (_, record) in found.items()}

    # Byte-identical copies: one content hash in both classes means the label cannot be trusted.
    labels_per_hash = samples.groupby("content_hash")["label"].nunique()
    conflicting = set(labels_per_hash[labels_per_hash > 1].index)
    n_conflicting = int(samples["content_hash"].isin(conflicting).sum())
    if conflicting:
        _warn(f"dropped {n_conflicting} file(s) whose identical copy sits in the other class folder (label conflict)")
        samples = samples[~samples["content_hash"].isin(conflicting)]
    role_of = {name: r["role"] for name, r in records.items()}
    role = samples["source"].map(role_of)
    copies = (role == "train") & samples["content_hash"].isin(set(samples.loc[role != "train", "content_hash"]))
    copied = samples[copies].groupby(["source", "label"]).size()  # why a class may be left with no image
    if copies.any():  # a held-out image must not be trained on through a copy in a training source
        _warn(f"left {int(copies.sum())} training image(s) out: byte-identical to images of a held-out or --eval set")
        samples = samples[~copies]
    n_files = len(samples)
    n_exact_dupes = n_files - samples["content_hash"].nunique()
    near_duplicates = None
    if cfg.split_strategy == "grouped":
        # one pass over every source (absolute files): a re-saved copy in another source joins the group
        samples = samples.assign(group=near_duplicate_groups(Path("/"), samples.assign(path=samples["file"]),
                                                             progress=progress))
        near_duplicates = group_report(samples)
        print(f"[crackcore.data] near-duplicate groups: {near_duplicates['groups']} groups for "
              f"{near_duplicates['images']} images, {near_duplicates['multi_image_groups']} with several images "
              f"({near_duplicates['images_in_multi_groups']} images), largest "
              f"{[g['size'] for g in near_duplicates['largest_groups']]}", file=sys.stderr)
    else:
        samples = samples.assign(group=samples["content_hash"])
    if cfg.group_by is not None:
        samples = samples.assign(group=photo_groups(samples, cfg.group_by))

    if cfg.subset is not None:  # an --eval folder is scored whole
        external = samples["source"].isin(list(cfg.external))
        samples = pd.concat([select_subset(samples[~external], cfg.subset, cfg.split_seed), samples[external]])
    samples = samples.reset_index(drop=True)

    images, bad = load_images([Path(f) for f in samples["file"]], samples, cfg.image_size, progress=progress)
    if bad:
        first = next(iter(bad))
        _warn(f"skipped {len(bad)} unreadable image file(s), e.g. {samples.at[first, 'path']} ({bad[first]})")
        keep = np.array([i not in bad for i in range(len(samples))])
        samples = samples[keep].reset_index(drop=True)
        images = np.ascontiguousarray(images[keep])
    for name, record in records.items():
        for label, class_name in enumerate(CLASSES):
            if not ((samples["source"] == name) & (samples["label"] == label)).any():
                if copied.get((name, label), 0):
                    held = ", ".join(n for n, r in records.items() if r["role"] != "train")
                    raise DataError(f"no {class_name} images left under {record['root']}: its {copied[(name, label)]} "
                                    f"{class_name} image(s) are byte-identical copies of images in {held}, which are "
                                    "never trained on; pass an --eval / held-out folder that does not copy the "
                                    "training images")
                raise DataError(f"no readable {class_name} images left under {record['root']}; every file failed to "
                                "decode")

    role = samples["source"].map(role_of)  # again: rows were subset and unreadable ones dropped
    samples = samples.assign(split=assign_splits(samples, cfg.split_fractions, cfg.split_seed).where(role == "train", role))
    for split in SPLITS:
        have = set(samples.loc[(samples["split"] == split) & (role == "train"), "label"])
        if have != {0, 1}:
            raise DataError(f"the {split} split has no {'/'.join(CLASSES[l] for l in {0, 1} - have)} images with "
                            f"{len(samples)} images in all; use a larger --subset or more data")
    kinds = {r["kind"] for r in records.values()}
    source = {
        "kind": kinds.pop() if len(kinds) == 1 else "mixed",
        "root": records[samples["source"].iat[0]]["root"] if len(records) == 1 else {n: r["root"] for n, r in records.items()},
        "files_found": n_files + sum(r["skipped_non_image"] + r["skipped_non_utf8_name"] for r in records.values())
        + n_conflicting,
        "images_used": len(samples),
        "exact_duplicate_files": int(n_exact_dupes),
        "skipped_non_image": sum(r["skipped_non_image"] for r in records.values()),
        "skipped_non_utf8_name": sum(r["skipped_non_utf8_name"] for r in records.values()),
        "skipped_unreadable": len(bad),
        "split_strategy": cfg.split_strategy,
        "groups": int(samples["group"].nunique()),
        "subset_per_class": cfg.subset,
        "near_duplicates": near_duplicates,
        "image_size": cfg.image_size,
        "sources": {n: {**r, "images": int((samples["source"] == n).sum())} for n, r in records.items()},
    }
    data = PreparedData(samples=samples, images=images, image_size=cfg.image_size, source=source)
    data.source["counts"] = data.counts()
    if n_exact_dupes:
        print(f"[crackcore.data] {n_exact_dupes} byte-identical duplicate file(s) found; each duplicate group is kept "
              "inside one split", file=sys.stderr)
    return data


# --------------------------------------------------------------------------- serving


def normalize(batch: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """float [B,3,H,W] in [0,1] -> ImageNet-normalised (in place when the caller owns `batch`:
    no new batch-sized buffers on the hot path)."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std) if inplace else (batch - mean) / std


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a (possibly read-only, memory-mapped or object-store) uint8 array.
    Nothing writes through it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array" - we never write
        return torch.from_numpy(images)


class BatchLoader:
    """Batches of (uint8 images, labels, sample indices) straight from the decoded array.
    On CUDA the whole split is moved to the GPU once when it takes under a quarter of this
    run's memory (`gpu_share` of the GPU: trials packed on one GPU all start at once and each
    sees the same free memory), so an epoch costs no host work at all; otherwise batches are
    gathered, pinned and copied asynchronously."""

    def __init__(self, data: PreparedData, split: str, batch_size: int, device: torch.device,
                 shuffle: bool, seed: int = 0, drop_last: bool = False, gpu_share: float = 1.0,
                 sources: list[str] | None = None):
        self.index = torch.from_numpy(data.indices(split, sources))
        self.labels = torch.from_numpy(data.samples["label"].to_numpy()[self.index.numpy()])
        self.images = as_tensor(data.images)
        self.batch_size, self.device, self.shuffle, self.seed, self.drop_last = batch_size, device, shuffle, seed, drop_last
        self.epoch = 0
        self.on_device: torch.Tensor | None = None
        if device.type == "cuda":
            nbytes = len(self.index) * self.images[0].numel()
            free, total = torch.cuda.mem_get_info(device)
            if nbytes < 0.25 * min(free, gpu_share * total):
                self.on_device = self.images[self.index.numpy()].to(device)
                self.labels = self.labels.to(device)

    def __len__(self) -> int:
        n = len(self.index)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n, g = len(self.index), torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):  # drop_last: whole batches only
            pos = order[start:start + self.batch_size]
            if self.on_device is not None:
                pos_d = pos.to(self.device, non_blocking=True)
                yield self.on_device[pos_d], self.labels[pos_d], self.index[pos]
                continue
            rows = self.index[pos]
            x = self.images[rows]
            y = self.labels[pos]
            if self.device.type == "cuda":
                x, y = x.pin_memory().to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y, rows


class CrackDataset(torch.utils.data.Dataset):
    """Per-image view for notebooks and standard DataLoaders: (float normalised [3,S,S],
    label). Reads the same decoded cache and split as training, so there is one split and
    one decoder. `augment_policy` applies the per-image form of a crackcore policy, drawing from
    torch's global RNG as torchvision transforms do (DataLoader seeds each worker from it)."""

    def __init__(self, data: PreparedData, split: str | None = None, augment_policy: str = "none"):
        self.data = data
        self.rows = np.arange(len(data.samples)) if split is None else data.indices(split)
        self.transform = per_image_transform(augment_policy, data.image_size)
        self.images = as_tensor(data.images)

    @classmethod
    def from_folder(cls, root: str | Path, split: str | None = None, image_size: int = 227,
                    augment_policy: str = "none", split_seed: int = 0, subset: int | None = None) -> "CrackDataset":
        cfg = TrainConfig(data=str(root), image_size=image_size, split_seed=split_seed, subset=subset)
        return cls(prepare_data(cfg), split, augment_policy)

    def __len__(self) -> int:
        return len(self.rows)

    def sample_id(self, i: int) -> str:
        return str(self.data.samples.at[int(self.rows[i]), "path"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        img = self.transform(self.images[row].float().div(255))
        return normalize(img.unsqueeze(0))[0], int(self.data.samples.at[row, "label"])


def model_inputs(x_u8: torch.Tensor, augment_policy: str = "none", generator: torch.Generator | None = None,
                 channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,3,S,S] batch -> augmented, ImageNet-normalised float, on the batch's device."""
    if x_u8.dtype != torch.uint8:  # a float batch could come back unchanged and be normalised in place
        raise TypeError(f"model_inputs takes the uint8 batches of BatchLoader, not {x_u8.dtype}")
    x = normalize(batch_augment(x_u8, augment_policy, generator), inplace=True)  # a new float tensor: ours to modify
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
