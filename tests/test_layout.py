"""The package's import layers: a module imports only modules of lower layers, so there is no
import loop and nothing low (a leaf, the core) reaches up to an entry point or to Ray."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first; the leaves import nothing of the project
    {"crackcore.exceptions", "crackcore.hashing", "crackcore.images", "crackcore.metrics", "crackcore.calibration",
     "crackcore.faults", "crackcore.progress", "crackcore.studyfiles"},
    {"crackcore.devices", "crackcore.checkpoint", "crackcore.config", "crackcore.outputs", "crackcore.cli",
     "crackcore.tracking", "crackcore.shift", "crackcore.model",
     "crackcore.lift", "crackcore.journal"},
    # serving: a model behind one interface, and the reader of study files; neither needs training or data
    {"crackcore.classifier", "crackcore.results"},
    {"crackcore.augment", "crackcore.neardup", "crackcore.synthetic", "crackcore.download",
     "crackcore.sources"},
    {"crackcore.sites"},
    {"crackcore.data", "crackcore.flags"},
    {"crackcore.adaptation"},
    {"crackcore.train"},
    # entry points: no command imports another
    {"crackcore.fit", "crackcore.predict", "crackcore.bench", "crackcore.export", "crackcore.calibrate",
     "crackcore.adapt"},
    {"tune.settings", "tune.storage", "tune.search", "tune.trainable", "tune.tracking"},
    {"tune.cluster", "tune.trial_runs"},
    {"tune.trials", "tune.replay"},
    {"tune.run", "tune.report", "tune.curves"},
]
SERVING = ("crackcore.predict", "crackcore.export", "crackcore.calibrate")  # the field's commands
TRAINING_FLOOR = {"crackcore.train", "crackcore.data", "crackcore.augment", "crackcore.neardup", "crackcore.synthetic"}


def project_imports(path: Path, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def test_every_import_goes_to_a_lower_layer() -> None:
    files = {f"{p.parent.name}.{p.stem}": p for d in ("crackcore", "tune") for p in (REPO / d).glob("*.py")
             if p.stem != "__init__"}
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    assert set(files) == set(layer), f"give each module a layer: {sorted(set(files) ^ set(layer))}"
    upward = [f"{m} -> {n}" for m, p in files.items() for n in sorted(project_imports(p, set(files)) - {m})
              if layer[n] >= layer[m]]
    assert not upward, f"imports that are not to a lower layer: {upward}"


def test_crackcore_never_imports_ray() -> None:
    files = sorted((REPO / "crackcore").glob("*.py"))
    with_ray = [p.name for p in files if project_imports(p, {"ray"}) or any(
        n.startswith("ray.") for n in _imported_names(p))]
    assert not with_ray, f"crackcore is usable without Ray; these import it: {with_ray}"


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_serving_commands_stay_off_the_training_floor() -> None:
    """predict, export and calibrate import neither training nor data preparation, directly or
    through what they import; loading a model in a field app pulls in no scipy either."""
    import subprocess
    import sys

    modules = ", ".join(("crackcore.classifier", *SERVING))  # one process: none of them pulls in any
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m in {sorted(TRAINING_FLOOR)!r} or m == 'scipy'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", f"import {modules} pulls in {out.stdout.strip()}"
