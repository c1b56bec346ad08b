"""The package's import layers: a module imports only modules of lower layers, so there is no
import loop and nothing low (a leaf, the core) reaches up to an entry point or to Ray."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first; the leaves import nothing of the project
    {"crackcore.exceptions", "crackcore.hashing", "crackcore.images", "crackcore.metrics", "crackcore.calibration",
     "crackcore.faults", "crackcore.progress"},
    {"crackcore.checkpoint", "crackcore.config", "crackcore.outputs", "crackcore.cli", "crackcore.results",
     "crackcore.tracking", "crackcore.shift"},
    {"crackcore.augment", "crackcore.model", "crackcore.neardup", "crackcore.synthetic", "crackcore.download",
     "crackcore.sources"},
    {"crackcore.data"},
    {"crackcore.train"},
    {"crackcore.classifier"},
    {"crackcore.fit", "crackcore.predict", "crackcore.bench", "crackcore.export"},
    {"crackcore.calibrate"},  # an entry point too, built on predict's load_model
    {"crackcore.adapt"},  # an entry point built on calibrate's site reading
    {"tune.storage", "tune.search", "tune.trainable", "tune.tracking"},
    {"tune.cluster"},
    {"tune.trials"},
    {"tune.run", "tune.report"},
]


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
