"""Shared fixtures. Test data is resolved once: $CRACK_TEST_DATA, then the real sample in
../shared/data/concrete-crack-sample, then the real sample embedded in the package, then the
synthetic generator; the header says which."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "concrete-crack-sample"

# Every test process and the Ray workers it starts share one decode cache, never download
# weights, and keep the user's ~/.cache untouched.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="crack-tests-"))
os.environ.setdefault("CRACK_CACHE", str(_SESSION_TMP / "cache"))
os.environ["CRACK_OFFLINE"] = "1"
os.environ.pop("CRACK_WEIGHTS", None)
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("TORCH_HOME", str(_SESSION_TMP / "torch-home"))


def _resolve_test_data() -> tuple[Path, str]:
    if os.environ.get("CRACK_TEST_DATA"):
        return Path(os.environ["CRACK_TEST_DATA"]), "$CRACK_TEST_DATA"
    if (SHARED_SAMPLE / "Positive").is_dir():
        return SHARED_SAMPLE, "shared real sample"
    from crackcore.sources import EMBEDDED_SAMPLE

    if (EMBEDDED_SAMPLE / "Positive").is_dir():
        return EMBEDDED_SAMPLE, "embedded real sample"
    from crackcore.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(_SESSION_TMP / "synthetic", n_per_class=150, image_size=96, seed=0)
    return root, "synthetic generator (no real data found)"


TEST_DATA, TEST_DATA_KIND = _resolve_test_data()


def pytest_report_header(config: pytest.Config) -> str:
    return f"crack test data: {TEST_DATA_KIND} at {TEST_DATA}"


@pytest.fixture(scope="session")
def crack_data() -> Path:
    """Root of a Positive/ Negative/ image folder (real images when available)."""
    return TEST_DATA


TINY_REFERENCE = '{ lr = 0.02, freeze_depth = 0, augment_policy = "none" }'


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real study (real Ray, real Optuna, real images): 4 trials x 2 epochs at 32 px, then a
    2-epoch retrain, recorded in an MLflow store beside it (storage/mlflow.db). Shared by the study,
    report, inspection and tracking tests. Returns the study folder."""
    storage = tmp_path_factory.mktemp("studies")
    # the default experiment with a reference that is not a trial's setting: the pick is never it,
    # so the reference is retrained beside the pick and the lift measured (final_metrics.json "lift")
    experiment = storage / "study.toml"
    experiment.write_text(f"reference = {TINY_REFERENCE}\n" + (REPO / "experiments" / "study.toml").read_text())
    cmd = [sys.executable, str(REPO / "tune" / "run.py"), "--smoke-test", "--config", str(experiment), "--data", str(TEST_DATA),
           "--storage-path", str(storage), "--study-name", "tiny", "--subset", "60", "--seed", "1",
           "--mlflow", f"sqlite:///{storage}/mlflow.db"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny study failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return storage / "tiny"


@pytest.fixture(scope="session")
def walls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two more sources whose images are windows of photos (PHOTO__rYcX.jpg): the shared masonry
    and quay-wall sets, else windows made from the test data (4 per photo) where they are missing."""
    shared = {name: REPO.parent / "shared" / "data" / f"{name}-crack-sample" for name in ("masonry", "quay-wall")}
    if all((root / "Positive").is_dir() for root in shared.values()):
        return shared
    import shutil

    built = {}
    for k, name in enumerate(shared):
        built[name] = root = tmp_path_factory.mktemp(name)
        for cls in ("Positive", "Negative"):
            (root / cls).mkdir()
            for i, f in enumerate(sorted((TEST_DATA / cls).glob("*.jpg"))[40 * k:40 * k + 40]):
                shutil.copy(f, root / cls / f"{name}{i // 4}__r0c{i % 4}.jpg")
    return built
