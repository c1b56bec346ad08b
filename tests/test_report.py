"""The study report on a real tiny study, and on its edge cases."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from crackcore.results import load_optuna_study, load_study
from tune.report import main

REPO = Path(__file__).resolve().parents[1]
FIGURES = {"learning_curves.png", "lr_vs_val_acc.png", "val_acc_by_setting.png", "importance.png",
           "final_history.png", "confusion_roc.png"}


@pytest.fixture
def study(tiny_study: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_study, copy, ignore=shutil.ignore_patterns("ray"))
    return copy


def test_report_figures_and_numbers(study: Path, capsys) -> None:
    assert main([str(study), "--max-errors", "4"]) == 0
    report = study / "report"
    md = (report / "report.md").read_text()
    pngs = {p.name for p in report.glob("*.png")}
    errors = pd.read_parquet(study / "errors.parquet")
    import optuna
    completed = [t.value for t in load_optuna_study(load_study(study)).trials
                 if t.state == optuna.trial.TrialState.COMPLETE]
    if len(set(completed)) >= 2:
        assert FIGURES <= pngs
    else:  # nothing for fANOVA to attribute: the report says why instead of drawing
        assert FIGURES - {"importance.png"} <= pngs and "importance.png" not in pngs
        reason = ("fewer than 2 completed trials" if len(completed) < 2 else
                  f"all {len(completed)} completed trials reached the same validation accuracy")
        assert f"Not drawn: {reason}" in md
    for name in pngs:
        with Image.open(report / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200, name
        assert f"]({name})" in md and f'src="{name}"' in (report / "index.html").read_text()
    m = json.loads((study / "final_metrics.json").read_text())
    assert f"{100 * m['test_accuracy']:.2f} % (n={m['n_test']}" in md
    assert f"misclassified test images: {m['errors']}" in md and m["errors"] == len(errors)
    if len(errors):
        assert f"Showing {min(4, len(errors))} of {len(errors)}" in md
    assert "report.md" in capsys.readouterr().out


def test_rerun_replaces_the_report_whole(study: Path) -> None:
    assert main([str(study)]) == 0
    (study / "report" / "stale.txt").write_text("old")
    assert main([str(study)]) == 0
    assert not (study / "report" / "stale.txt").exists()
    assert [p.name for p in study.iterdir() if p.name.startswith(".report")] == []


def test_edge_cases_synthetic_one_trial_zero_errors(study: Path) -> None:
    meta = json.loads((study / "study.json").read_text())
    meta["data_source"]["kind"] = "synthetic"
    (study / "study.json").write_text(json.dumps(meta))
    trials = pd.read_parquet(study / "trials.parquet").head(1)
    trials.to_parquet(study / "trials.parquet")
    history = pd.read_parquet(study / "history.parquet")
    history[history["trial_id"].isin(trials["trial_id"])].to_parquet(study / "history.parquet")
    pd.read_parquet(study / "errors.parquet").head(0).to_parquet(study / "errors.parquet")
    assert main([str(study)]) == 0
    md = (study / "report" / "report.md").read_text()
    assert "SYNTHETIC DATA" in md and "No misclassified samples" in md
    assert not (study / "report" / "errors_grid.png").exists()


def test_incomplete_study_reports_what_exists(study: Path, capsys) -> None:
    for name in ("final_metrics.json", "final_history.parquet", "errors.parquet", "predictions.parquet", "model.pt",
                 "study.json"):
        (study / name).unlink()
    assert main([str(study)]) == 0
    err = capsys.readouterr().err
    assert "missing from the study folder" in err and "final_metrics.json" in err
    assert (study / "report" / "learning_curves.png").exists()
    md = (study / "report" / "report.md").read_text()
    assert "Incomplete study" in md and "wall time: not recorded" in md and "nan" not in md


def test_not_a_study_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "tune/report.py", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert re.match(r"error: .* is not a study folder", proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("leaked", [0, 7])
def test_split_comparison_shows_both_strategies_and_the_leak(study: Path, leaked: int) -> None:
    m = json.loads((study / "final_metrics.json").read_text())
    side = {"test_accuracy": 0.95, "n_test": 200, "ci95_low": 0.91, "ci95_high": 0.97, "errors": 10, "groups": 900}
    m["split_comparison"] = {"random": {**side, "test_images_with_near_duplicate_in_train": leaked},
                             "grouped": {**side, "test_accuracy": 0.9, "test_images_with_near_duplicate_in_train": 0}}
    (study / "final_metrics.json").write_text(json.dumps(m))
    assert main([str(study)]) == 0
    md = (study / "report" / "report.md").read_text()
    assert re.search(rf"\| random \| 95\.00 % \(n=200, 95 % CI 91\.00-97\.00 %\) \| 900 \| {leaked} \|", md)
    assert "| grouped | 90.00 % (n=200" in md
    assert ("cannot differ by leakage" in md) == (leaked == 0)
    umask = os.umask(0)
    os.umask(umask)
    assert (study / "report").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_importance_attributes_variance_to_the_setting_that_drives_it(study: Path) -> None:
    # The tiny study's few trials often tie; add completed trials whose accuracy depends on the
    # augmentation policy alone, so fANOVA has a known answer.
    import optuna

    optuna_study = load_optuna_study(load_study(study))
    distributions = optuna_study.trials[0].distributions
    policies = distributions["augment_policy"].choices
    for i in range(12):
        params = {"lr": 10 ** (-4 + 3 * ((i * 5) % 12) / 11), "freeze_depth": min(i % 3, distributions["freeze_depth"].high),  # random init: depth 0 only
                  "augment_policy": policies[i % len(policies)]}
        value = 0.5 + 0.1 * policies.index(params["augment_policy"])
        optuna_study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    assert main([str(study)]) == 0
    assert (study / "report" / "importance.png").exists()
    # the report's own ranking (the figure's numbers) puts the setting that drives accuracy first
    assert "Ranking: augment_policy " in (study / "report" / "report.md").read_text()


def test_roc_curve_area_matches_roc_auc_with_tied_scores() -> None:
    import numpy as np

    from crackcore.metrics import roc_auc, roc_curve

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(9), np.ones(8)]
    for score in (np.ones(17), rng.choice([0.0, 0.5, 1.0], 17), rng.random(17)):  # saturated, ties, none
        fpr, tpr = roc_curve(y, score)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, score))


def test_error_grid_flag_and_damaged_files_are_one_line(study: Path, capsys) -> None:
    from crackcore.cli import run_main

    assert main([str(study), "--max-errors", "0"]) == 0
    assert not (study / "report" / "errors_grid.png").exists()
    assert "errors.parquet" in (study / "report" / "report.md").read_text()
    assert run_main(main, [str(study), "--max-errors", "-1"]) == 1
    assert "--max-errors must be >= 0" in capsys.readouterr().err
    good = (study / "report" / "report.md").read_text()
    for name, damage in (("errors.parquet", b""), ("study.json", b'{"name": "tin')):
        saved = (study / name).read_bytes()
        (study / name).write_bytes(damage)
        assert run_main(main, [str(study)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{name} is damaged" in err[0], err
        (study / name).write_bytes(saved)
    assert (study / "report" / "report.md").read_text() == good  # the earlier report is untouched


# A script the test appends to its own copy of the page: once everything has loaded, it writes what
# the browser saw of each figure into the DOM, which --dump-dom then prints.
_PROBE = """<script>window.addEventListener('load', () => { for (const img of document.images)
  img.setAttribute('data-loaded', img.complete && img.naturalWidth > 0 ? 'yes' : 'no'); });</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed; `make test` installs it (as root, with apt) for this test")
        pytest.skip("chromium is not installed (`make test` as root installs it with apt)")
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--allow-file-access-from-files", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_page_in_a_real_browser(study: Path, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    chromium = _chromium()
    assert main([str(study)]) == 0
    report = study / "report"
    page = report / "index.html"
    probe = report / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    proc = _browser(chromium, "--dump-dom", probe.as_uri())
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]

    class Page(HTMLParser):  # the DOM as the browser built it: headings, each table's rows, images
        def __init__(self) -> None:
            super().__init__()
            self.heading, self.tables, self.images, self._in = "", {}, [], None

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag in ("h1", "h2", "h3"):
                self._in, self.heading = tag, ""
            elif tag == "table":
                self.tables[self.heading] = []
            elif tag == "tr":
                self.tables[self.heading].append([])
            elif tag in ("td", "th"):
                self.tables[self.heading][-1].append(tag)
            elif tag == "img":
                self.images.append(dict(attrs))

        def handle_endtag(self, tag: str) -> None:
            self._in = None if tag == self._in else self._in

        def handle_data(self, data: str) -> None:
            if self._in:
                self.heading += data

    dom = Page()
    dom.feed(proc.stdout)
    trials = pd.read_parquet(study / "trials.parquet")
    rows = dom.tables["Top 10 trials"]
    header, body = rows[0], rows[1:]
    assert set(header) == {"th"} and len(header) >= 5
    assert len(body) == min(10, len(trials)) and all(r == ["td"] * len(header) for r in body)
    assert "Images per split" in dom.tables and "Cluster" in dom.tables
    assert "{" not in proc.stdout.split("<body>")[1].split("Images per split")[0]  # no raw Python dict in the summary
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert sorted(img["src"] for img in dom.images) == pngs and pngs
    assert [img["src"] for img in dom.images if img.get("data-loaded") != "yes"] == []  # every figure loaded

    shot = tmp_path / "page.png"
    proc = _browser(chromium, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2400) and len(im.convert("L").getcolors(2 ** 16) or range(2 ** 16)) > 20  # drawn
