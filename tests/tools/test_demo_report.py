"""The demo report's comparison, per row: pretrained minus random init paired by seed, its spread, the verdict;
and the commands shown as a user types them in the checkout. (The whole chain: tests/e2e/test_demo.py.)"""

import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import demo  # noqa: E402
import demo_report  # noqa: E402


def _results():
    knn = {"pretrained": {"seed0": {"top1": 20.0}, "seed1": {"top1": 22.0}},
           "random": {"seed0": {"top1": 11.0}, "seed1": {"top1": 10.0}}}
    linear = {"pretrained": {"seed0": {"top1": 12.0, "top5": 50.0}}, "random": {"seed0": {"top1": 14.0, "top5": 52.0}}}
    det = {init: {"per_seed": {"seed0": {"bbox": {"AP50": ap, "AP": ap / 2, "AP75": None},
                                         "segm": {"AP50": ap, "AP": ap / 3, "AP75": 0.0}}}}
           for init, ap in (("pretrained", 3.0), ("random", 1.0))}
    return {"knn": knn, "linear": linear, "detection": det}


def test_rows_pair_the_seeds_and_give_the_spread_of_the_differences():
    rows = {(r["metric"], r["backbone"]): r for r in demo_report.comparison_rows(_results())}
    knn = rows["k-NN top-1 (k=5)", "ResNet-18"]
    diffs = [20.0 - 11.0, 22.0 - 10.0]
    assert knn["n_seeds"] == 2 and knn["difference"] == statistics.fmean(diffs)
    assert math.isclose(knn["spread"], statistics.stdev(diffs)) and knn["beats_random"] is True
    assert knn["pretrained"] == 21.0 and math.isclose(knn["random_std"], statistics.stdev([11.0, 10.0]))
    lin = rows["linear top-1", "ResNet-18"]
    assert lin["n_seeds"] == 1 and lin["spread"] is None and lin["difference"] == -2.0 and lin["beats_random"] is False
    assert rows["Mask R-CNN C4 bbox AP50", "ResNet-50"]["difference"] == 2.0
    assert ("Mask R-CNN C4 bbox AP75", "ResNet-50") not in rows  # no value in any seed: no row
    assert ("semi-supervised (10%) top-1", "ResNet-18") not in rows  # a stage this run did not have


def test_a_difference_inside_its_spread_does_not_beat_random_init():
    row = demo_report.compare({"seed0": 12.0, "seed1": 10.0}, {"seed0": 9.0, "seed1": 10.5})
    assert row["difference"] == 1.25 and row["spread"] > row["difference"] and row["beats_random"] is False


def test_the_verdict_line_names_the_rows_that_do_not_beat_random_init():
    rows = demo_report.comparison_rows(_results())
    line = demo_report.verdict_line(rows)
    # linear: pretrained below random init; segm AP75: 0.0 against 0.0 (no difference is not a win)
    assert line == (f"Pretrained minus random init is larger than its spread over seeds on {len(rows) - 3} of "
                    f"{len(rows)} rows; not on: linear top-1 (ResNet-18), linear top-5 (ResNet-18), "
                    "Mask R-CNN C4 segm AP75 (ResNet-50).")
    table = demo_report.table_lines(rows)
    assert "| k-NN top-1 (k=5) | ResNet-18 | 21.0 ± 1.4 | 10.5 ± 0.7 | +10.5 ± 2.1 | yes |" in table
    assert "| linear top-1 | ResNet-18 | 12.0 | 14.0 | -2.0 | no (1 seed: no spread) |" in table
    good = [r for r in rows if r["beats_random"]]
    assert demo_report.verdict_line(good).startswith(f"Pretrained minus random init is larger than its spread over "
                                                     f"seeds on all {len(good)} rows")


def test_commands_are_shown_relative_to_the_checkout(tmp_path):
    d = demo.Demo(tmp_path / "work", "tiny")
    argv = [str(ROOT / ".venv" / "bin" / "submit"), "linear",
            f"data.root={tmp_path}/work/data/synthetic/classification",
            f"--config-file={ROOT}/configs/detection/synthetic_R_50_C4.yaml", "seed=1"]
    assert d.shown(argv) == ["submit", "linear", "data.root=data/synthetic/classification",
                             "--config-file=configs/detection/synthetic_R_50_C4.yaml", "seed=1"]


def test_the_demo_profile_runs_two_seeds_of_every_classification_stage():
    seeds = demo.PROFILES["demo"]["seeds"]
    assert all(seeds[k] >= 2 for k in ("knn", "knn_resnet50", "linear", "linear_resnet50", "semi"))
