"""Regenerate the embedded real sample (crackcore/sample_data/concrete) from the 6,000-image
concrete sample (Özgenel 2019, CC BY 4.0; already free of exact and near-duplicates):

    python tools/embedded_sample.py ../shared/data/concrete-crack-sample            # rewrite it
    python tools/embedded_sample.py ../shared/data/concrete-crack-sample --check    # compare only

Rule: in each class folder, rank the files by SHA-256 of "SEED:Class/name" and keep the first
PER_CLASS. Ranking by a hash of the name (not the listing order) makes the choice independent
of the file system and stable when files are added to the source. Files are copied byte for
byte; SHA256SUMS lists them. The folder's README.md (licence, citation, this rule) is kept."""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

SEED = 0
PER_CLASS = 600
CLASSES = ("Positive", "Negative")
MAX_BYTES = 15_000_000
TARGET = Path(__file__).resolve().parents[1] / "crackcore" / "sample_data" / "concrete"


def rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def choose(source: Path, per_class: int = PER_CLASS, seed: int = SEED) -> list[str]:
    """Paths (Class/name.jpg) of the chosen files, in SHA256SUMS order."""
    chosen = []
    for cls in CLASSES:
        names = [f"{cls}/{p.name}" for p in (source / cls).iterdir() if p.suffix.lower() == ".jpg"]
        if len(names) < per_class:
            raise SystemExit(f"{source / cls} holds {len(names)} JPEGs, fewer than {per_class}")
        chosen += sorted(sorted(names, key=lambda n: rank(n, seed))[:per_class])
    return chosen


def sums(root: Path, paths: list[str]) -> str:
    return "".join(f"{hashlib.sha256((root / p).read_bytes()).hexdigest()}  {p}\n" for p in paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the concrete sample: Positive/ and Negative/ JPEGs")
    p.add_argument("--to", type=Path, default=TARGET)
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--check", action="store_true", help="only check that --to holds exactly the chosen files")
    a = p.parse_args(argv)
    paths = choose(a.source, a.per_class, a.seed)
    expected = sums(a.source, paths)
    if a.check:
        have = sorted(f"{p.parent.name}/{p.name}" for cls in CLASSES for p in (a.to / cls).glob("*"))
        ok = have == sorted(paths) and (a.to / "SHA256SUMS").read_text() == expected == sums(a.to, paths)
        print(f"{a.to}: {'matches' if ok else 'DIFFERS FROM'} the rule ({len(paths)} files)")
        return 0 if ok else 1
    total = sum((a.source / p).stat().st_size for p in paths)
    if total > MAX_BYTES:
        raise SystemExit(f"the chosen files take {total:,} bytes, over the {MAX_BYTES:,} allowed; lower --per-class")
    for cls in CLASSES:
        shutil.rmtree(a.to / cls, ignore_errors=True)
        (a.to / cls).mkdir(parents=True)
    for rel in paths:
        shutil.copyfile(a.source / rel, a.to / rel)
    (a.to / "SHA256SUMS").write_text(expected)
    print(f"{len(paths)} files ({total:,} bytes) -> {a.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
