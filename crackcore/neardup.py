"""Near-duplicate groups, so a "grouped" split keeps re-saved copies of a crop together.

The public dataset stores some crops more than once with slightly different JPEG encoding
(mean pixel difference about 2/255). Two signatures per image, computed once per file
content and cached:

* a 64-bit perceptual hash (pHash, from the `imagehash` package: the DCT of a 32x32 grey
  thumbnail, robust to re-compression and small brightness shifts) finds candidate pairs;
* a 32x32 grey thumbnail with its mean removed confirms them: the mean absolute difference
  of two re-saves is tiny, while two different patches of concrete differ clearly.

pHash alone is not enough on this low-contrast texture. Measured on the shared sample
(6,000 images, all truly distinct) and on 300 planted re-saves (JPEG quality 50-95,
brightness +-5 %):
  pHash distance   distinct nearest neighbours: min 4, 1st pct 8, median 16
                   planted re-saves: median 0, 95th pct 4, max 6
  thumbnail MAD    distinct pairs with pHash <= 10: min 4.21, 1st pct 6.8 (grey levels)
                   planted re-saves: 99th pct 1.32, max 1.66
so a pair is a near-duplicate when pHash distance <= 10 AND zero-mean thumbnail MAD <= 3.0.
Groups are connected components of that relation (scipy's connected_components); byte-identical files are
always in one group. Candidates come from a chunked all-pairs XOR + popcount in numpy:
about 1.6e9 pair checks for 40,000 images, a few seconds.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from crackcore.images import TENSOR_SUFFIX, cache_dir, decode_file, io_workers, open_image, pil_rgb
from crackcore.outputs import write_parquet
from crackcore.progress import track

MAX_PHASH_DISTANCE = 10
MAX_THUMB_MAD = 3.0  # grey levels (0-255), after removing each thumbnail's mean
THUMB = 32
CACHE_FILE = "signatures-v2.parquet"  # v2: 16-bit images scaled, not clipped to white


def _signature(path: Path) -> tuple[int, bytes] | None:
    """None for a file that cannot be decoded: load_images reports and drops it later."""
    import imagehash
    from PIL import Image

    try:
        if path.suffix.lower() == TENSOR_SUFFIX:
            img = Image.fromarray(decode_file(path, 227).permute(1, 2, 0).numpy())
        else:
            img = open_image(path)  # the pixel limit, before load() decodes
            img.load()
    except Exception:
        return None
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit or float: convert("L") would clip them
        img = Image.fromarray(pil_rgb(img)[0].numpy())
    gray = img.convert("L")
    phash = int(str(imagehash.phash(gray)), 16)
    return phash, np.asarray(gray.resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8).tobytes()


def signatures(root: Path, samples: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """pHash + thumbnail per unique content hash, cached under $CRACK_CACHE/phash. Contents
    that cannot be decoded have no row (and are not cached: tried again next time)."""
    cache_path = cache_dir() / "phash" / CACHE_FILE
    cached = pd.read_parquet(cache_path) if cache_path.is_file() else pd.DataFrame(
        {"content_hash": pd.Series(dtype=str), "phash": pd.Series(dtype="int64"), "thumb": pd.Series(dtype=object)})
    first = samples.drop_duplicates("content_hash")
    todo = first[~first["content_hash"].isin(set(cached["content_hash"]))]
    if len(todo):
        paths = [root / p for p in todo["path"]]
        with ThreadPoolExecutor(max_workers=io_workers()) as pool:
            sigs = list(track(pool.map(_signature, paths), "near-duplicate signatures", len(paths), unit="images",
                              enabled=progress))
        ok = [i for i, sig in enumerate(sigs) if sig is not None]
        new = pd.DataFrame({"content_hash": todo["content_hash"].to_numpy()[ok],
                            "phash": np.array([sigs[i][0] for i in ok], dtype=np.uint64).view(np.int64),
                            "thumb": [sigs[i][1] for i in ok]})
        cached = pd.concat([cached, new], ignore_index=True)
        if ok:
            write_parquet(cached, cache_path)
    return cached[cached["content_hash"].isin(set(first["content_hash"]))].reset_index(drop=True)


def near_duplicate_groups(root: Path, samples: pd.DataFrame, max_distance: int = MAX_PHASH_DISTANCE,
                          max_mad: float = MAX_THUMB_MAD, progress: bool = True) -> pd.Series:
    """Group key per sample (index-aligned): the smallest content hash in its group. A file
    that cannot be decoded is its own group."""
    sig = signatures(Path(root), samples, progress)
    if sig.empty:
        return samples["content_hash"].copy()
    hashes = sig["phash"].to_numpy().view(np.uint64)
    thumbs = np.frombuffer(b"".join(sig["thumb"]), dtype=np.uint8).reshape(len(sig), -1).astype(np.float32)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    n, chunk, pairs = len(hashes), 512, []
    for start in range(0, n, chunk):  # chunk x n pHash distances at a time
        rows, cols = np.nonzero(np.bitwise_count(hashes[start:start + chunk, None] ^ hashes[None, :]) <= max_distance)
        rows += start
        rows, cols = rows[rows < cols], cols[rows < cols]
        near = np.abs(thumbs[rows] - thumbs[cols]).mean(axis=1) <= max_mad
        pairs.append(np.stack([rows[near], cols[near]]))
    rows, cols = np.concatenate(pairs, axis=1)
    _, roots = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)), directed=False)
    content = sig["content_hash"].to_numpy()
    group_of_content = dict(zip(content, pd.Series(content).groupby(roots).transform("min")))
    return samples["content_hash"].map(group_of_content).fillna(samples["content_hash"])


def group_report(samples: pd.DataFrame, top: int = 5) -> dict[str, Any]:
    """Counts of a samples table with a `group` column, for printing and study.json."""
    sizes = samples.groupby("group").size().sort_values(ascending=False)
    multi = sizes[sizes > 1]
    return {"images": int(len(samples)), "groups": int(len(sizes)), "singletons": int((sizes == 1).sum()),
            "multi_image_groups": int(len(multi)), "images_in_multi_groups": int(multi.sum()),
            "cross_class_groups": int((samples.groupby("group")["label"].nunique() > 1).sum()),
            "largest_groups": [{"group": g, "size": int(s), "paths": samples.loc[samples["group"] == g, "path"].head(5).tolist()}
                               for g, s in multi.head(top).items()]}


def near_duplicate_leaks(samples: pd.DataFrame, near_groups: pd.Series) -> int:
    """How many test images of a split (a samples table with `path`, `group`, `split`) have a
    near-duplicate in train, by the near-duplicate groups `near_groups` (indexed by path): what
    a random split leaks. Images `near_groups` does not know count as their own group."""
    group = samples["path"].map(near_groups).fillna(samples["group"])
    in_train = set(group[samples["split"] == "train"])
    return int(((samples["split"] == "test") & group.isin(in_train)).sum())
