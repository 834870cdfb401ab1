"""sample_data/seed_analysis.py: per-model metrics agree with the evaluation report, and the paired dMoE-vs-baseline
comparison recovers a known per-case shift with a CI that covers it."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.evaluation.metrics import PerImage
from napari_dmoe.evaluation.report import fairness_report

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["White"] * 30 + ["Asian"] * 8 + ["Black"] * 6


def _module():
    spec = importlib.util.spec_from_file_location("seed_analysis", ROOT / "sample_data/seed_analysis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(folder: Path, dice: np.ndarray) -> None:
    folder.mkdir(parents=True)
    with open(folder / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "group", "rim_dice", "rim_iou", "cup_dice", "cup_iou"])
        for i, (g, d) in enumerate(zip(GROUPS, dice)):
            w.writerow([f"case{i}", g, d[0], 0.5, d[1], 0.5])


def test_metrics_match_the_evaluation_report() -> None:
    rng = np.random.default_rng(1)
    dice = rng.uniform(0.5, 0.95, (len(GROUPS), 2))
    ours = _module().metrics(GROUPS, dice, ["rim", "cup"])
    records = [PerImage(str(i), g, {"rim": {"dice": d[0], "iou": 0.5, "hd95": 1.0},
                                    "cup": {"dice": d[1], "iou": 0.5, "hd95": 1.0}})
               for i, (g, d) in enumerate(zip(GROUPS, dice))]
    report = fairness_report(records, ["rim", "cup"], n_boot=10)
    assert ours["dice"] == pytest.approx(report["mean_over_classes"]["dice"])
    assert ours["es_dice"] == pytest.approx(report["mean_over_classes"]["es_dice"])


@pytest.mark.slow
def test_paired_comparison_recovers_a_known_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
    for seed in (1, 2, 3):
        _write(tmp_path / "reports/test-a" / f"fundus-baseline-s{seed}", truth + rng.normal(0, 0.01, truth.shape))
        _write(tmp_path / "reports/test-a" / f"fundus-dmoe-s{seed}", truth + 0.05 + rng.normal(0, 0.01, truth.shape))
    mod = _module()
    assert mod.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    paired = summary["contrasts"]["fundus/test-a"]["dmoe-baseline"]
    assert paired["seeds_used"] == [1, 2, 3] and paired["per_case"]["share_improved"] > 0.95
    for key in ("delta_dice", "delta_worst_group_dice"):
        lo, hi = paired[key]["ci95"]
        assert lo < 0.05 < hi and paired[key]["value"] == pytest.approx(0.05, abs=0.01)
    assert summary["by_method"]["fundus/test-a"]["dmoe"]["dice"]["std"] < 0.01
    assert (tmp_path / "out/seeds.png").stat().st_size > 10_000
    assert "| dmoe | 3 |" in (tmp_path / "out/seed_study.md").read_text()


@pytest.mark.slow
def test_runs_folders_pool_contrasts_and_the_final_weights(tmp_path: Path) -> None:
    """Two runs folders are pooled; every contrast with shared seeds is computed; ``--checkpoint last`` reads only the
    ``-last`` reports; one model in two folders is refused rather than silently picked."""
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
    shift = {"baseline": 0.0, "moe": 0.02, "dmoe": 0.05}
    for seed in (1, 2):
        for method, folder in (("baseline", "a"), ("moe", "b"), ("dmoe", "b")):
            noise = rng.normal(0, 0.01, truth.shape)
            _write(tmp_path / folder / "reports/test-a" / f"fundus-{method}-s{seed}", truth + shift[method] + noise)
            last = tmp_path / folder / "reports/test-a" / f"fundus-{method}-s{seed}-last"
            _write(last, truth - shift[method] + noise)
    mod = _module()
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert mod.main(["--runs", *runs, "--out", str(tmp_path / "best")]) == 0
    best = json.loads((tmp_path / "best/summary.json").read_text())
    contrasts = best["contrasts"]["fundus/test-a"]
    assert set(contrasts) == {"dmoe-baseline", "dmoe-moe", "moe-baseline"}
    assert contrasts["dmoe-moe"]["delta_dice"]["value"] == pytest.approx(0.03, abs=0.01)
    assert "dMoE - MoE on the same" in (tmp_path / "best/seed_study.md").read_text()
    assert mod.main(["--runs", *runs, "--out", str(tmp_path / "last"), "--checkpoint", "last"]) == 0
    last = json.loads((tmp_path / "last/summary.json").read_text())
    assert last["checkpoint"] == "last"
    assert last["contrasts"]["fundus/test-a"]["dmoe-baseline"]["delta_dice"]["value"] == pytest.approx(-0.05, abs=0.01)
    _write(tmp_path / "a/reports/test-a/fundus-dmoe-s1", truth)
    with pytest.raises(SystemExit, match="also in another runs folder"):
        mod.main(["--runs", *runs, "--out", str(tmp_path / "clash")])
    # each method from the folder of its own chosen recipe: a's baseline (and its dMoE is left out) and b's dMoE
    assert mod.main(["--runs", f"{runs[0]}:baseline", f"{runs[1]}:dmoe", "--out", str(tmp_path / "pick")]) == 0
    assert mod._runs_and_methods("C:/runs/seeds") == (Path("C:/runs/seeds"), None)  # a path's own colon
    assert mod._runs_and_methods("runs/a:dmoe,moe") == (Path("runs/a"), {"dmoe": None, "moe": None})
    picked = json.loads((tmp_path / "pick/summary.json").read_text())
    assert set(picked["contrasts"]["fundus/test-a"]) == {"dmoe-baseline"}
    assert picked["contrasts"]["fundus/test-a"]["dmoe-baseline"]["delta_dice"]["value"] == pytest.approx(0.05, abs=0.01)


@pytest.mark.slow
def test_old_recipe_pairing_goals_and_test_filter(tmp_path: Path) -> None:
    """``--old``: each method's runs paired with an earlier study's cases.csv.gz of the same seeds (a known +0.03
    shift is recovered, per seed and group); the goals are checked per seed; ``--tests`` keeps only the named
    test folders (validation sets never mix into a study's tables)."""
    rng = np.random.default_rng(4)
    truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
    for folder, shift in (("old", 0.0), ("new", 0.03)):
        for seed in (1, 2):
            for method, extra in (("baseline", 0.0), ("dmoe", 0.01)):
                dice = truth + shift + extra + rng.normal(0, 0.005, truth.shape)
                _write(tmp_path / folder / "reports/test-a" / f"fundus-{method}-s{seed}", dice)
                _write(tmp_path / folder / "reports/val-v" / f"fundus-{method}-s{seed}", dice)
    mod = _module()
    assert mod.main(["--runs", str(tmp_path / "old"), "--out", str(tmp_path / "old-out")]) == 0
    assert mod.main(["--runs", str(tmp_path / "new"), "--out", str(tmp_path / "new-out"), "--tests", "test-a",
                     "--old", str(tmp_path / "old-out/cases.csv.gz")]) == 0
    summary = json.loads((tmp_path / "new-out/summary.json").read_text())
    assert list(summary["by_method"]) == ["fundus/test-a"]  # val-v left out
    pairs = summary["old_vs_new"]["contrasts"]["fundus/test-a"]
    assert set(pairs) == {"baseline", "dmoe"} and pairs["dmoe"]["seeds_used"] == [1, 2]
    assert pairs["dmoe"]["delta_dice"]["value"] == pytest.approx(0.03, abs=0.005)
    assert "delta_es_dice" not in pairs["dmoe"]  # per-case mean Dice cannot give it
    per_seed = pairs["baseline"]["per_seed"]["1"]
    assert per_seed["new"]["Black"] - per_seed["old"]["Black"] == pytest.approx(0.03, abs=0.01)
    goal = summary["goals"]["fundus/test-a"]
    assert goal["all_seeds_dmoe_worst_at_least_baseline"] and goal["no_group_drop_over_0.02"]
    assert goal["no_group_below_0.7"] == (min(min(r["groups"].values()) for r in summary["runs"]) >= 0.7)
    text = (tmp_path / "new-out/seed_study.md").read_text()
    assert "new recipe - old recipe" in text and "Goals, fundus, test-a" in text


def test_checkpoint_rule_is_chosen_on_validation_sets_only(tmp_path: Path) -> None:
    import importlib.util as iu

    spec = iu.spec_from_file_location("checkpoint_rule", ROOT / "sample_data/checkpoint_rule.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(5)
    truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
    for test, last_shift in (("val-a", 0.02), ("val-v", 0.02), ("test-a", -0.2)):  # the test must not count
        _write(tmp_path / "reports" / test / "fundus-dmoe-s1", truth)
        _write(tmp_path / "reports" / test / "fundus-dmoe-s1-last", truth + last_shift)
    result = mod.choose(tmp_path / "reports")
    assert {r["set"] for r in result["rows"]} == {"val-a", "val-v"} and result["chosen"] == "last"
    assert result["mean_worst_group"]["last"] - result["mean_worst_group"]["best"] == pytest.approx(0.02)


def test_recipe_is_chosen_on_validation_sets_with_the_floor_first(tmp_path: Path) -> None:
    import importlib.util as iu

    spec = iu.spec_from_file_location("recipe_choice", ROOT / "sample_data/recipe_choice.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    truth = np.random.default_rng(6).uniform(0.75, 0.9, (len(GROUPS), 2))
    black = np.array([g == "Black" for g in GROUPS])[:, None]
    shifts = {"plain": (0.0, 0.0, 0.0), "better": (0.03, 0.03, -0.3),  # a test must not count
              "higher-but-collapses": (0.1, -0.0, 0.0)}
    for name, (a, v, test) in shifts.items():
        for seed in (1, 2):
            collapse = name.startswith("higher") and seed == 2
            for set_, shift in (("val-a", a), ("val-v", v), ("test-a", test)):
                dice = truth + shift - (0.3 * black if collapse and set_ == "val-v" else 0)
                _write(tmp_path / name / "reports" / set_ / f"fundus-dmoe-s{seed}", np.clip(dice, 0, 1))
    result = mod.choose({n: tmp_path / n for n in shifts}, "dmoe")
    assert result["ranking"] == ["better", "plain", "higher-but-collapses"] and result["chosen"] == "better"
    assert set(result["candidates"]["plain"]["worst_group"]) == {"val-a/s1", "val-a/s2", "val-v/s1", "val-v/s2"}
    assert result["candidates"]["higher-but-collapses"]["min"] < 0.7
    (tmp_path / "partial" / "reports" / "val-a" / "fundus-dmoe-s1").mkdir(parents=True)
    _write(tmp_path / "partial" / "reports" / "val-a" / "fundus-dmoe-s3", truth)
    with pytest.raises(SystemExit, match="same sets and seeds"):
        mod.choose({"plain": tmp_path / "plain", "partial": tmp_path / "partial"}, "dmoe")
    # a third validation set (val-w) enters only when asked for; a test set can never be one
    for name in shifts:
        for seed in (1, 2):
            _write(tmp_path / name / "reports" / "val-w" / f"fundus-dmoe-s{seed}",
                   np.clip(truth - (0.2 if name == "better" else 0.0), 0, 1))
    wide = mod.choose({n: tmp_path / n for n in shifts}, "dmoe", ("val-a", "val-v", "val-w"))
    assert wide["chosen"] == "plain" and wide["validation"] == ["val-a", "val-v", "val-w"]
    assert mod.choose({n: tmp_path / n for n in shifts}, "dmoe")["chosen"] == "better"  # the default rule unchanged
    with pytest.raises(SystemExit):
        mod.main(["--method", "dmoe", "--candidate", f"plain={tmp_path / 'plain'}", "--validation", "val-a", "test-a"])


def test_the_moving_average_is_a_third_checkpoint_everywhere(tmp_path: Path) -> None:
    """recipe.ema's reports (``-ema``) are read by the checkpoint rule, by ``recipe_choice`` as NAME@ema and by
    ``seed_analysis --runs FOLDER:dmoe@ema``; the best-checkpoint readers never mix them in."""
    import importlib.util as iu

    def module(name: str):
        spec = iu.spec_from_file_location(name, ROOT / f"sample_data/{name}.py")
        mod = iu.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    truth = np.random.default_rng(7).uniform(0.72, 0.9, (len(GROUPS), 2))
    for seed in (1, 2):
        for set_ in ("val-a", "val-v", "test-a"):
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}", truth)
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}-last", truth - 0.01)
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}-ema", truth + 0.03)
            _write(tmp_path / "reports" / set_ / f"fundus-baseline-s{seed}", truth - 0.02)
    rule = module("checkpoint_rule").choose(tmp_path / "reports")
    assert rule["chosen"] == "ema" and set(rule["mean_worst_group"]) == {"best", "last", "ema"}
    choice = module("recipe_choice").choose({"plain": tmp_path, "plain@ema": tmp_path}, "dmoe")
    assert choice["chosen"] == "plain@ema"
    gap = choice["candidates"]["plain@ema"]["mean"] - choice["candidates"]["plain"]["mean"]
    assert gap == pytest.approx(0.03)
    rows = module("recipe_choice").test_table({"plain": tmp_path, "plain@ema": tmp_path}, "dmoe", ["test-a", "site-b"])
    assert len(rows) == 4 and rows[2].startswith("| plain | test-a |") and rows[3].startswith("| plain@ema | test-a |")
    worst = _module().metrics(GROUPS, truth + 0.03, ["rim", "cup"])["worst_group_dice"]
    assert f"| {worst:.3f} ± 0.000 |" in rows[3] and "s1 " in rows[3] and "s2 " in rows[3]
    mod = _module()
    assert mod._runs_and_methods(f"{tmp_path}:dmoe@ema,baseline") == (tmp_path, {"dmoe": "ema", "baseline": None})
    assert mod._runs_and_methods(f"{tmp_path}:dmoe@nonsense") == (Path(f"{tmp_path}:dmoe@nonsense"), None)
    assert mod.main(["--runs", f"{tmp_path}:dmoe@ema,baseline", "--tests", "test-a", "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    dmoe = [r for r in summary["runs"] if r["method"] == "dmoe"]
    assert len(dmoe) == 2 and summary["sources"][0]["methods"] == {"dmoe": "ema", "baseline": "best"}
    expected = mod.metrics(GROUPS, truth + 0.03, ["rim", "cup"])["worst_group_dice"]
    assert all(r["worst_group_dice"] == pytest.approx(expected) for r in dmoe)
    assert "dmoe ema" in (tmp_path / "o/seed_study.md").read_text()


@pytest.mark.slow
def test_site_pool_averages_sites_and_counts_seed_pairs(tmp_path: Path) -> None:
    """site_pool.py: two sites where dMoE is +0.06 and -0.02 on every case pool to +0.02 with a CI covering it; the
    (site, seed) pairs count where dMoE's worst group is at least the baseline's; a site missing a method is refused."""
    import sys

    sys.path.insert(0, str(ROOT / "sample_data"))
    import site_pool

    rng = np.random.default_rng(3)
    for test, shift in (("site-x", 0.06), ("site-y", -0.02)):
        truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
        for seed in (1, 2):
            _write(tmp_path / "base/reports" / test / f"fundus-baseline-s{seed}",
                   truth + rng.normal(0, 0.005, truth.shape))
            _write(tmp_path / "new/reports" / test / f"fundus-dmoe-s{seed}",
                   truth + shift + rng.normal(0, 0.005, truth.shape))
    out = tmp_path / "pooled.json"
    runs = [f"{tmp_path / 'new'}:dmoe", f"{tmp_path / 'base'}:baseline"]
    assert site_pool.main(["--runs", *runs, "--tests", "site-x", "site-y", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    w = result["delta_worst_group_dice"]
    assert w["value"] == pytest.approx(0.02, abs=0.01) and w["ci95"][0] < 0.02 < w["ci95"][1]
    assert w["per_site"]["site-x"] == pytest.approx(0.06, abs=0.01)
    assert w["per_site"]["site-y"] == pytest.approx(-0.02, abs=0.01)
    assert result["pairs_dmoe_at_least_baseline"] == "2 of 4"
    with pytest.raises(SystemExit, match="site-z"):
        site_pool.main(["--runs", *runs, "--tests", "site-x", "site-z"])


def test_recipe_by_site_lists_each_set_with_its_camera(tmp_path: Path) -> None:
    """recipe_by_site.py: two recipes' worst-group difference per set (mean over seeds), the sets ordered by field
    of view, each beside its camera's values."""
    import sys

    sys.path.insert(0, str(ROOT / "sample_data"))
    import recipe_by_site

    rng = np.random.default_rng(4)
    for test, shift in (("site-b", 0.04), ("val-v", -0.03)):
        truth = rng.uniform(0.6, 0.9, (len(GROUPS), 2))
        for seed in (1, 2):
            _write(tmp_path / "one/reports" / test / f"fundus-dmoe-s{seed}", truth + shift)
            _write(tmp_path / "two/reports" / test / f"fundus-dmoe-s{seed}", truth)
    out = tmp_path / "by_site.md"
    assert recipe_by_site.main([str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| site-") or line.startswith("| val-")]
    assert [r.split(" | ")[0] for r in rows] == ["| site-b", "| val-v"]  # fov 0.85 before 1.12
    assert rows[0].endswith("| 0.850 | +0.040 |") and rows[1].endswith("| 1.120 | -0.030 |")


def test_site_calibrated_reports_are_their_own_variant_and_zooms_sit_beside_the_camera(tmp_path: Path) -> None:
    """Issue 26, seventh step: ``-zoom1``/``-zoom`` reports are read as NAME@zoom1/@zoom and never mixed into the
    plain ones; ``site_zoom.py --summary`` lists each set's measured zooms beside its camera's field of view."""
    import importlib.util as iu
    import sys

    sys.path.insert(0, str(ROOT / "sample_data"))
    spec = iu.spec_from_file_location("recipe_choice", ROOT / "sample_data/recipe_choice.py")
    choice_mod = iu.module_from_spec(spec)
    spec.loader.exec_module(choice_mod)
    truth = np.random.default_rng(8).uniform(0.72, 0.9, (len(GROUPS), 2))
    for seed in (1, 2):
        for set_ in ("val-a", "val-v"):
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}", truth)
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}-zoom1", truth + 0.01)
            _write(tmp_path / "reports" / set_ / f"fundus-dmoe-s{seed}-zoom", truth - 0.02)
    result = choice_mod.choose({"as-is": tmp_path, "one@zoom1": tmp_path, "two@zoom": tmp_path}, "dmoe")
    assert result["ranking"] == ["one@zoom1", "as-is", "two@zoom"]
    means = {k: v["mean"] for k, v in result["candidates"].items()}
    assert means["one@zoom1"] - means["as-is"] == pytest.approx(0.01)
    assert means["as-is"] - means["two@zoom"] == pytest.approx(0.02)

    spec = iu.spec_from_file_location("site_zoom", ROOT / "sample_data/site_zoom.py")
    site_zoom = iu.module_from_spec(spec)
    spec.loader.exec_module(site_zoom)
    runs = tmp_path / "robust-mix"
    for set_, (one, two) in {"val-a": (1.0, 1.0), "val-v": (0.97, 0.92), "val-r1": (1.01, 1.02)}.items():
        for seed, shift in ((1, 0.0), (2, 0.02)):
            folder = runs / "zoom" / set_
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"fundus-dmoe-s{seed}.json").write_text(json.dumps(
                {"one_round": {"zoom": one + shift}, "two_rounds": {"zoom": two + shift}}))
    rows = site_zoom.summary([runs], ["val-a", "val-v", "val-r1"])
    assert rows[2].startswith("| val-a | 1.000 | 1.000 | 1.010 | 1.010 |")
    assert rows[3].startswith("| val-v | 1.120 | 0.893 | 0.980 | 0.930 |")  # site V: fov 1.12
    assert rows[-1].strip() == "robust-mix zoom: Spearman with 1/fov +1.00 over 3 sets"
    worst = _module().metrics(GROUPS, truth, ["rim", "cup"])["worst_group_dice"]
    table = site_zoom.worst_by_set(tmp_path, "dmoe", ["val-a", "val-v"])
    assert table[3] == f"| val-v | 1.120 | {worst:.3f} | {worst + 0.01:.3f} | {worst - 0.02:.3f} | - |"
