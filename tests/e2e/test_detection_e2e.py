"""End-to-end detection transfer on a tiny COCO-format shapes set, from a converted pretraining checkpoint.

One module fixture fine-tunes two seeds through `submit detection --seeds 2 --cluster local --wait` (the
paper's protocol shape: several seeds -> mean +- std) with a schedule small enough for 2 CPU cores; the
tests then read what the runs and the launcher's aggregation wrote.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "detection" / "synthetic_R_50_C4.yaml"
ITERS = 30


def make_converted_weights(tmp: Path) -> Path:
    """A pretraining checkpoint (random ResNet-50 backbone) converted by intl-convert's function to a .pkl."""
    import torchvision

    from common.checkpoint import BACKBONE_PREFIX, save_checkpoint
    from transfer.convert import convert

    torch.manual_seed(0)
    sd = {BACKBONE_PREFIX + k: v for k, v in torchvision.models.resnet50().state_dict().items()
          if not k.startswith("fc.")}
    ckpt = save_checkpoint({"model": sd, "ema_model": None, "epoch": 1, "step": 1, "finished": True,
                            "config": {"model": {"arch": "resnet50"}}}, tmp / "pretrain.pth")
    out = tmp / "backbone.pkl"
    convert(ckpt, out, log=lambda *_: None)
    return out


def tiny_opts(data: Path, weights: Path) -> list[str]:
    coco = data / "coco"
    sets = [["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
            ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]]
    return [
        "INTL.COCO_JSON_SETS", repr(sets), "MODEL.WEIGHTS", str(weights),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(ITERS), "SOLVER.STEPS", f"({ITERS - 5},)",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "4", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "TEST.DETECTIONS_PER_IMAGE", "10", "TEST.PRECISE_BN.NUM_ITER", "2",
    ]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """`submit detection --seeds 2 --cluster local --wait` (the user's command) from the test's own folder."""
    from common.synthetic import SyntheticSpec, generate
    from slurm.submit import main as submit

    tmp = tmp_path_factory.mktemp("detection")
    data = tmp / "data"
    generate(data, SyntheticSpec(cls_size=16, cls_train_per_class=1, cls_val_per_class=1,
                                 det_size=64, det_train_images=16, det_val_images=4))
    weights = make_converted_weights(tmp)
    opts = tiny_opts(data, weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("INTL_SUBMIT_POLL_S", "1")
        t0 = time.time()
        assert submit(["detection", "--cluster", "local", "--gpus", "1", "--seeds", "2", "--wait", "--name", "exp",
                       "--config-file", str(CONFIG), *opts]) == 0
        print(f"2 seeds through submit: {time.time() - t0:.0f} s")
    exp = tmp / "outputs" / "detection" / "exp"
    results = {seed: json.loads((exp / f"seed{seed}" / "results.json").read_text()) for seed in (0, 1)}
    return {"exp": exp, "opts": opts, "results": results, "data": data}


def test_fine_tuning_learns_and_evaluates_with_coco_evaluator(experiment):
    from common.runlog import is_complete, read_metrics

    for seed, res in experiment["results"].items():
        run = experiment["exp"] / f"seed{seed}"
        assert is_complete(run)
        for task in ("bbox", "segm"):
            for metric in ("AP50", "AP", "AP75"):
                assert 0.0 <= res[task][metric] <= 100.0
        assert res["seed"] == seed and res["iterations"] == ITERS and \
            res["base_lr"] == pytest.approx(0.01)  # 0.02 x 2/4
        rows = [r for r in read_metrics(run) if "total_loss" in r]
        assert [r["step"] for r in rows] == list(range(ITERS))
        fifth = ITERS // 5
        first = sum(r["total_loss"] for r in rows[:fifth]) / fifth
        last = sum(r["total_loss"] for r in rows[-fifth:]) / fifth
        assert last < 0.8 * first, (first, last)
        assert (run / "loss_curve.png").stat().st_size > 5000
        assert (run / "model_final.pth").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
        # the AP comes from COCOEvaluator's predictions on the held-out split (val image ids only)
        preds = json.loads((run / "inference" / "coco_instances_results.json").read_text())
        val_ids = {im["id"]
                   for im in json.loads((experiment["data"] / "coco" / "instances_val.json").read_text())["images"]}
        assert preds and {p["image_id"] for p in preds} <= val_ids
        assert {"segmentation", "bbox"} <= set(preds[0])
        log = (run / "log.txt").read_text()
        assert "STARTING a new run at iteration 0 from" in log and "backbone.pkl" in log
        assert "new tensors start from scratch as expected" in log and "roi_heads.res5.norm" in log
        assert "norm: config asks SyncBN, using BN" in log
        assert "effective batch 2 images (config written for 4): lr 0.01" in log


def test_two_seeds_aggregate_to_mean_and_std(experiment):
    import statistics

    from transfer.detection.aggregate import main

    by_submit = json.loads((experiment["exp"] / "results.json").read_text())  # written by `submit --wait`
    assert main([str(experiment["exp"])]) == 0  # the stand-alone aggregation gives the same table
    summary = json.loads((experiment["exp"] / "results.json").read_text())
    assert summary == by_submit
    assert summary["n_seeds"] == 2 and summary["seeds"] == [0, 1]
    for seed in (0, 1):  # each seed's provenance (its job's, with the submit command) is in the aggregate
        own = experiment["results"][seed]["provenance"]
        assert summary["provenance"]["per_seed"][f"seed{seed}"] == own
        assert own["world_size"] == 1 and own["command_line"].startswith("submit detection --cluster local")
        assert json.loads((experiment["exp"] / f"seed{seed}" / "COMPLETE").read_text())["provenance"] == own
    assert summary["columns"] == ["bbox AP50", "bbox AP", "bbox AP75", "segm AP50", "segm AP", "segm AP75"]
    r0, r1 = experiment["results"][0], experiment["results"][1]
    for task in ("bbox", "segm"):
        for metric in ("AP50", "AP", "AP75"):
            assert summary["mean"][task][metric] == pytest.approx((r0[task][metric] + r1[task][metric]) / 2)
            assert summary["std"][task][metric] == pytest.approx(statistics.stdev([r0[task][metric], r1[task][metric]]))
    table = (experiment["exp"] / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    assert header == "| run | seeds | bbox AP50 | bbox AP | bbox AP75 | segm AP50 | segm AP | segm AP75 |"
    assert f"{summary['mean']['bbox']['AP50']:.1f} ± {summary['std']['bbox']['AP50']:.1f}" in table


def test_complete_run_returns_at_once_and_resume_continues(experiment, capsys):
    from common.runlog import read_metrics
    from transfer.detection.train_net import run_task

    run = experiment["exp"] / "seed0"
    t0 = time.time()
    again = run_task(str(CONFIG), experiment["opts"] + ["SEED", "0"], str(run))
    assert again == experiment["results"][0] and time.time() - t0 < 30
    assert "is complete" in capsys.readouterr().out

    # an interrupted run (no COMPLETE yet) resumes from its last checkpoint instead of starting again
    (run / "COMPLETE").unlink()
    (run / "results.json").unlink()
    steps_before = len(read_metrics(run))
    resumed = run_task(str(CONFIG), experiment["opts"] + ["SEED", "0"], str(run), resume=True)
    assert "RESUMING this run from" in (run / "log.txt").read_text()
    assert len(read_metrics(run)) == steps_before  # no iteration was trained again
    assert resumed["bbox"] == experiment["results"][0]["bbox"]
    assert (run / "COMPLETE").exists()
