"""Data sources: which sub-folders of a dataset hold crack and no-crack images (the class-folder
layouts public crack datasets ship in), the listing of their files, and `--data NAME=PATH` specs."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from crackcore.config import NAME
from crackcore.exceptions import ConfigError, DataError
from crackcore.images import IMAGE_SUFFIXES, TENSOR_SUFFIX, readable_name, utf8_name

CRACK_FOLDERS = ("Positive", "crack", "cracked", "CD", "CW", "CP")  # label 1; matched in any case
NO_CRACK_FOLDERS = ("Negative", "no_crack", "nocrack", "no-crack", "uncracked", "UD", "UW", "UP")  # label 0
SDNET_FOLDERS = ("cd", "cw", "cp", "ud", "uw", "up")
FOLDER_LABEL = {**{n.lower(): 1 for n in CRACK_FOLDERS}, **{n.lower(): 0 for n in NO_CRACK_FOLDERS}}
# The default data when no --data, $CRACK_DATA or downloaded set is given: 1,400 real patches
# shipped in the package (see its README.md); `--data synthetic` asks for the procedural set.
EMBEDDED_SAMPLE = Path(__file__).resolve().parent / "sample_data" / "concrete"
# where `python -m crackcore.download --to data/` puts the public set in a checkout
DOWNLOADED = Path(__file__).resolve().parents[1] / "data" / "concrete-crack-images"
EMBEDDED_CITATION = "Özgenel 2019, CC BY 4.0"
SYNTHETIC = "synthetic"
LAYOUTS = ("Positive/Negative, crack/no_crack (or nocrack, no-crack), cracked/uncracked, or SDNET2018's "
           "CD,CW,CP/UD,UW,UP (directly or under D/, W/, P/)")


def _warn(msg: str) -> None:
    print(f"[crackcore.sources] WARNING: {msg}", file=sys.stderr, flush=True)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "") if names else "none"


def _class_folders(root: Path) -> list[tuple[int, Path]]:
    """(label, folder) of every class folder of an existing folder, ordered by label then path;
    SDNET2018's are looked for one level down (D/CD, ...) when the root holds none."""
    found = [d for d in _subdirs(root) if d.name.lower() in FOLDER_LABEL]
    if not found:  # only SDNET2018's codes nest: a folder of whole datasets must not merge into one
        found = [d for top in _subdirs(root) for d in _subdirs(top) if d.name.lower() in SDNET_FOLDERS]
    if not found:
        names = [d.name + "/" for d in _subdirs(root)]
        raise DataError(f"no class folders in {root} (sub-folders: {_listing(names)}); --data must hold a crack "
                        f"and a no-crack folder in one of these layouts (names in any case): {LAYOUTS}")
    labelled = sorted(((FOLDER_LABEL[d.name.lower()], d) for d in found), key=lambda t: (t[0], t[1].relative_to(root)))
    missing = {0, 1} - {label for label, _ in labelled}
    if missing:
        label = missing.pop()
        have = [d for _, d in labelled]
        if any(d.name.lower() in ("positive", "negative") for d in have):  # today's wording for Positive/Negative
            raise DataError(f"class folder {have[0].parent / ('Positive' if label else 'Negative')} is missing; the "
                            "data folder must hold Positive/ (crack) and Negative/ (no crack) sub-folders")
        kind, names = ("crack", CRACK_FOLDERS) if label else ("no-crack", NO_CRACK_FOLDERS)
        raise DataError(f"{root} has no {kind} class folder (found only "
                        f"{', '.join(d.relative_to(root).as_posix() for d in have)}); add one named "
                        f"{', '.join(names)} (any case) or fix --data")
    return labelled


def _existing_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data PATH to a folder with Positive/ and Negative/, "
                        "or get the public dataset with: python -m crackcore.download --to data/")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; pass the folder that holds Positive/ and Negative/")
    return root


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() == TENSOR_SUFFIX


def _no_images(class_dir: Path) -> DataError:
    # rglob passes over a folder it may not list, so an unreadable folder looks empty: say which it is
    if not os.access(class_dir, os.R_OK | os.X_OK):
        return DataError(f"class folder {class_dir} cannot be read (permission denied); make it readable "
                         f"(chmod -R a+rX {class_dir}) or fix --data")
    return DataError(f"class folder {class_dir} has no images (.jpg/.png/.pt); add images or fix --data")


def warn_bad_names(names: list[Path], where: str | Path) -> None:
    """One line for the files skipped because their names are not UTF-8 (Arrow, and so every
    parquet table, cannot store such a name)."""
    if names:
        _warn(f"skipped {len(names)} file(s) under {readable_name(where)} whose names are not valid UTF-8, e.g. "
              f"{readable_name(names[0])}; rename them to UTF-8 (e.g. convmv -f latin1 -t utf8 -r --notest FOLDER) "
              "to use them")


def check_root(root: str | Path) -> Path:
    """Fail fast (before any work) on a data folder that cannot be the dataset; reads each class
    folder only up to its first image."""
    root = _existing_folder(root)
    for _, class_dir in _class_folders(root):
        if not any(p.is_file() and not p.name.startswith(".") and _is_image(p) for p in class_dir.rglob("*")):
            raise _no_images(class_dir)
    return root


def discover(root: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """List the images (JPEG/PNG/... files or saved `.pt` tensors) under the class folders of `root`:
    one row per file (path relative to root, label 1 = crack, bytes), and counts of what was
    skipped (non-image files; names that are not UTF-8, one warning line). Class folders: LAYOUTS,
    in any case. Raises DataError for a missing root, no recognised class folder, a missing class,
    or an empty class folder."""
    root = _existing_folder(root)
    rows, skipped_non_image, bad_names, empty = [], [], [], []
    for label, class_dir in _class_folders(root):
        found = 0
        for p in sorted(class_dir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            if not utf8_name(p.relative_to(root)):
                bad_names.append(p.relative_to(root))
            elif _is_image(p):
                rows.append((p.relative_to(root).as_posix(), label, p.stat().st_size))
                found += 1
            else:
                skipped_non_image.append(p.relative_to(root).as_posix())
        if found == 0:
            empty.append(class_dir)
    if skipped_non_image:
        _warn(f"skipped {len(skipped_non_image)} non-image file(s) under {root}, e.g. {skipped_non_image[0]}")
    warn_bad_names(bad_names, root)
    if empty:
        raise _no_images(empty[0])
    samples = pd.DataFrame(rows, columns=["path", "label", "bytes"])
    return samples, {"skipped_non_image": len(skipped_non_image), "skipped_non_utf8_name": len(bad_names)}


def default_data() -> str | None:
    """The data every tool uses when no --data is given: $CRACK_DATA, else the downloaded public
    set when present, else None (the caller's fallback: the experiment file's, then EMBEDDED_SAMPLE)."""
    return os.environ.get("CRACK_DATA") or (str(DOWNLOADED) if DOWNLOADED.is_dir() else None)


def data_setting(specs: list[str] | None) -> str | dict[str, str] | None:
    """TrainConfig.data from repeated --data flags: one bare PATH stays a path (one source, as
    always; the word `synthetic` is the procedural set), anything else is {name: path}."""
    if not specs:
        return None
    return specs[0] if len(specs) == 1 and "=" not in specs[0] else parse_sources(specs)


def parse_sources(specs: list[str]) -> dict[str, str]:
    """`NAME=PATH` or a bare `PATH` (named after its folder) -> {name: absolute path}, in order;
    the path `synthetic` stays the word (the procedural set). The paths are not checked here:
    discover() does that."""
    sources: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        path = path if sep else spec
        if not path:
            raise ConfigError(f"data source {spec!r} has no path; write NAME=PATH")
        resolved = SYNTHETIC if path == SYNTHETIC else Path(path).expanduser().resolve()
        name = name if sep else Path(resolved).name
        if not NAME.fullmatch(name):
            raise ConfigError(f"data source name {name!r} (from {spec!r}) must start with a letter or digit and hold "
                              "only letters, digits, '.', '_' and '-'; write NAME=PATH")
        if name in sources:
            raise ConfigError(f"data source name {name!r} is given twice ({sources[name]} and {resolved}); "
                              "name one of them with NAME=PATH")
        sources[name] = str(resolved)
    return sources
