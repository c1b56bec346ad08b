"""What tuning bought, on hand-made inputs: the paired interval of a lift, the tie set of the
choice rule and its preferences, the repeats ranked by the same rule, the rungs' fidelity."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crackcore.config import StudyConfig
from crackcore.exceptions import ConfigError
from crackcore.lift import lift_line
from crackcore.metrics import paired_difference


def test_paired_difference_counts_only_disagreements() -> None:
    # 1000 images both get right but 30 that only A gets right and 10 only B: +2 points
    a = np.r_[np.ones(1000), np.ones(30), np.zeros(10)]
    b = np.r_[np.ones(1000), np.zeros(30), np.ones(10)]
    d = paired_difference(a, b, seed=0)
    assert d["difference"] == pytest.approx(20 / 1040) and (d["a_only_right"], d["b_only_right"]) == (30, 10)
    assert 0 < d["ci95_low"] < d["difference"] < d["ci95_high"] < 0.04
    # the paired interval is narrower than the two accuracies' own intervals would suggest
    assert d["ci95_high"] - d["ci95_low"] < 0.025
    same = paired_difference(a, a)
    assert same["difference"] == same["ci95_low"] == same["ci95_high"] == 0
    swapped = paired_difference(b, a, seed=0)
    assert swapped["difference"] == pytest.approx(-d["difference"]) and swapped["ci95_high"] < 0


def test_paired_difference_resamples_whole_groups() -> None:
    # 20 photos of 10 windows each; on 4 photos A gets every window right and B none
    a = np.ones(200)
    b = np.r_[np.zeros(40), np.ones(160)]
    groups = np.repeat(np.arange(20), 10)
    by_image, by_group = paired_difference(a, b, seed=1), paired_difference(a, b, groups, seed=1)
    assert by_group["n_groups"] == 20 and by_image["n_groups"] == 200
    assert by_group["difference"] == by_image["difference"] == pytest.approx(0.2)
    # windows of one photo are not independent: the interval by photo is wider
    assert by_group["ci95_high"] - by_group["ci95_low"] > 1.5 * (by_image["ci95_high"] - by_image["ci95_low"])
    with pytest.raises(ValueError, match="same images"):
        paired_difference(a, b[:10])


def test_lift_line_says_bought_none_or_cost() -> None:
    base = {"pick_accuracy": 0.97, "reference_accuracy": 0.95, "n": 4800, "lift": 0.02}
    assert "tuning bought +2.00 points" in lift_line("other", {**base, "ci95_low": 0.01, "ci95_high": 0.03})
    assert "no measurable lift over the reference" in lift_line("other", {**base, "ci95_low": -0.01, "ci95_high": 0.03})
    assert "COST" in lift_line("other", {**base, "lift": -0.02, "ci95_low": -0.03, "ci95_high": -0.01})


def _table(**columns) -> pd.DataFrame:
    n = len(columns["trial_id"])
    base = {"status": ["COMPLETE"] * n, "epochs": [4] * n, "last_val_acc": [0.95] * n, "last_val_n": [200.0] * n,
            "lr": [1e-3 * (i + 1) for i in range(n)], "freeze_depth": [0] * n, "augment_policy": ["flip"] * n}
    return pd.DataFrame({**base, **columns})


def test_tie_set_and_its_preferences() -> None:
    from tune.trials import pick_best, rank_trials

    # 200 val images: a difference of 1.5 points is inside the noise, 9 points is not
    t = _table(trial_id=["a", "b", "c", "d"], last_val_acc=[0.99, 0.98, 0.90, 0.975],
               last_val_loss=[0.10, 0.12, 0.30, 0.13], freeze_depth=[0, 0, 0, 0])
    ranked = rank_trials(t)
    assert ranked.loc[ranked["tied"], "trial_id"].tolist() == ["a", "b", "d"]  # c is clearly worse
    assert pick_best(t)["trial_id"] == "a"  # no preference applies: the lowest loss
    # the reference (trial d's setting) is preferred inside the tie set
    reference = {"lr": 4e-3, "freeze_depth": 0, "augment_policy": "flip"}
    assert pick_best(t, reference=reference)["trial_id"] == "d"
    # ... but not from outside it
    assert pick_best(t, reference={"lr": 3e-3, "freeze_depth": 0, "augment_policy": "flip"})["trial_id"] == "a"
    # then the setting that trains fewer parameters (a deeper freeze)
    deeper = t.assign(freeze_depth=[0, 3, 0, 1])
    assert pick_best(deeper)["trial_id"] == "b"
    assert pick_best(deeper, reference={**reference, "freeze_depth": 1})["trial_id"] == "d"
    # many val images separate them all: the tie set is the leader alone
    sharp = t.assign(last_val_n=[100_000.0] * 4)
    assert rank_trials(sharp)["tied"].sum() == 1 and pick_best(sharp, reference=reference)["trial_id"] == "a"
    # seed 2 of the README: equal val accuracy, the reference's val loss three times the leader's:
    # the reference is kept (the loss-ranked pick was 0.67 points worse on 4,800 other patches)
    same = _table(trial_id=["p", "r"], last_val_acc=[159 / 161] * 2, last_val_n=[161.0] * 2,
                  last_val_loss=[0.019, 0.057], lr=[0.099, 1e-3])
    assert pick_best(same, reference={"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"})["trial_id"] == "r"
    # 161/161 has a spread too (one image added right and one wrong): 157/161 is not separated from it
    top = _table(trial_id=["p", "r"], last_val_acc=[1.0, 157 / 161], last_val_n=[161.0] * 2, last_val_loss=[0.02, 0.06])
    assert rank_trials(top)["tied"].all()
    # val losses lost with Ray's files (journal-recovered trials): ranked on accuracy all the same
    lost = t.assign(last_val_loss=np.nan)
    assert rank_trials(lost).loc[lambda r: r["tied"], "trial_id"].tolist()[0] == "a"


def test_repeats_are_ranked_by_the_same_rule() -> None:
    from tune.trials import rank_repeats

    rows = []
    for rank, (tid, accs) in enumerate({"x": [0.80, 0.81, 0.79], "y": [0.90, 0.91, 0.89],
                                        "z": [0.895, 0.80, 0.95]}.items(), start=1):
        rows += [{"config_rank": rank, "trial_id": tid, "seed": 10 * rank + i, "val_acc": v, "val_loss": 1 - v,
                  "n_val": 200, "lr": 1e-3 * rank, "freeze_depth": 0, "augment_policy": "flip"}
                 for i, v in enumerate(accs)]
    ranked = rank_repeats(pd.DataFrame(rows))
    assert ranked["trial_id"].tolist()[0] == "y" and ranked.set_index("trial_id")["tied"].to_dict() == {
        "y": True, "z": True, "x": False}  # z's seeds scatter: inside y's noise; x is clearly worse
    assert rank_repeats(pd.DataFrame(rows), reference={"lr": 3e-3, "freeze_depth": 0,
                                                       "augment_policy": "flip"})["trial_id"].iloc[0] == "z"


def test_rung_fidelity_is_spearman_over_trials_that_ran_all_epochs() -> None:
    from tune.trials import rung_fidelity

    trials = pd.DataFrame({"trial_id": list("abcde"), "status": ["COMPLETE"] * 4 + ["PRUNED"]})
    # at epoch 1 the ranking is the reverse of the end; at epoch 3 the same
    acc1, acc3, loss4 = [0.9, 0.8, 0.7, 0.6], [0.6, 0.7, 0.8, 0.9], [0.1, 0.1, 0.1, 0.1]
    history = pd.DataFrame([{"trial_id": t, "epoch": e, "val_acc": v, "val_loss": l}
                            for t, a1, a3, l in zip("abcd", acc1, acc3, loss4)
                            for e, v in ((1, a1), (3, a3), (4, a3))] + [{"trial_id": "e", "epoch": 1, "val_acc": 1.0,
                                                                       "val_loss": 0.0}])
    f = rung_fidelity(trials, history, [1, 3])
    assert f.to_dict("records") == [{"rung": 1, "n": 4, "spearman": pytest.approx(-1.0)},
                                    {"rung": 3, "n": 4, "spearman": pytest.approx(1.0)}]


def test_reference_must_be_inside_the_search_space() -> None:
    assert StudyConfig().reference_params().to_dict() == {"lr": 1e-3, "freeze_depth": 0, "augment_policy": "flip"}
    assert StudyConfig(reference={"lr": 0.01, "augment_policy": "none"}).reference_params().augment_policy == "none"
    with pytest.raises(ConfigError, match=r"reference = .* is outside the search space \(lr = 0.5\)"):
        StudyConfig(reference={"lr": 0.5, "freeze_depth": 0, "augment_policy": "flip"})
    with pytest.raises(ConfigError, match="outside the search space .*freeze_depth = 2"):
        StudyConfig(reference={"lr": 1e-3, "freeze_depth": 2}, space={"freeze_depths": [0, 1]})
    with pytest.raises(ConfigError, match="repeat_top=5 is more than the num_samples=4"):
        StudyConfig(num_samples=4, repeat_top=5)


def test_random_init_searches_freeze_depth_zero_only(capsys) -> None:
    from crackcore.model import WeightsInfo
    from tune.run import narrow_for_random_init

    random, imagenet = WeightsInfo("random", None, None, False), WeightsInfo("path", "/w.pth", "abc", True)
    assert narrow_for_random_init(StudyConfig(), random).space.freeze_depths == [0]
    assert "searches freeze depth 0 only" in capsys.readouterr().out
    assert narrow_for_random_init(StudyConfig(), imagenet).space.freeze_depths == [0, 1, 2, 3, 4, 5]
    asked = StudyConfig(space={"freeze_random_init": True})
    assert narrow_for_random_init(asked, random).space.freeze_depths == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="freezes depth 2, but with random init"):
        narrow_for_random_init(StudyConfig(reference={"lr": 1e-3, "freeze_depth": 2}), random)
