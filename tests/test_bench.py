"""The benchmark runs end to end in its --quick form and prints the documented JSON keys.
Speed itself is never asserted here: the figures come from full runs (see README)."""
from __future__ import annotations

import json
from pathlib import Path

from crackcore.bench import main

KEYS = {"device", "model_only_img_s", "pipeline_img_s", "pipeline_over_model_only", "pil_baseline_img_s",
        "speedup_over_pil_baseline", "eval_img_s", "peak_memory_mb", "loader_only_img_s", "pil_loader_only_img_s",
        "loader_speedup_over_pil"}


def test_quick_bench_prints_json_line(crack_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--data", str(crack_data), "--json-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(printed) and printed == json.loads(out.read_text())
    for key in KEYS - {"device"}:
        assert printed[key] > 0, key
    assert abs(printed["pipeline_over_model_only"] - printed["pipeline_img_s"] / printed["model_only_img_s"]) < 0.01
