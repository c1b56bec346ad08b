"""The project's hashes: SHA-256 of files (weights, archives), short content digests of
images (duplicates, cache keys) and the unit hash that fixes subsets and splits."""
import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): the basis of subsets and splits, so neither
    depends on file order or on which other files exist."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2**64
