"""Fast tests of detection transfer: configs, norm/batch choices, datasets, weights check, aggregation."""

from __future__ import annotations

import json
import pickle
import statistics
from pathlib import Path

import pytest
import torch

import transfer.detection  # noqa: F401  (registers the ROI head)
from transfer.detection.config import DetectionSetupError, adjust_for_run, load_config, resolve_norm, scale_to_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detection"


def synthetic_sets(synthetic_root) -> list[str]:
    """The overrides that point the synthetic detection config at the embedded COCO-format set."""
    coco = synthetic_root / "coco"
    return ["INTL.COCO_JSON_SETS", repr([["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
                                         ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]])]


def _build(cfg):
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.MODEL.RESNETS.NORM = resolve_norm(cfg.MODEL.RESNETS.NORM, 1, False)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


@pytest.mark.parametrize("name, max_iter, steps, train, test, mask, min_train", [
    ("coco_R_50_C4_1x", 90000, (60000, 80000), ("coco_2017_train",), ("coco_2017_val",), True,
     (640, 672, 704, 736, 768, 800)),
    ("coco_R_50_C4_2x", 180000, (120000, 160000), ("coco_2017_train",), ("coco_2017_val",), True,
     (640, 672, 704, 736, 768, 800)),
    ("voc0712_R_50_C4_24k", 24000, (18000, 22000), ("voc_2007_trainval", "voc_2012_trainval"), ("voc_2007_test",),
     False, tuple(range(480, 801, 32))),
])
def test_protocol_configs_read_back_and_build(name, max_iter, steps, train, test, mask, min_train):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    s = cfg.SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS), s.IMS_PER_BATCH, s.BASE_LR) == (max_iter, steps, 16, 0.02)
    assert s.AMP.ENABLED is False and cfg.INTL.REFERENCE_IMS_PER_BATCH == 16
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == min_train and cfg.INPUT.MIN_SIZE_TEST == 800
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST), cfg.MODEL.MASK_ON) == (train, test, mask)
    # what torchvision-style SSL weights need, and the transfer protocol's model settings
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530] and cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
    assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512 and cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 1000
    model = _build(cfg)
    assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
    assert model.roi_heads.box_predictor.cls_score.out_features == (81 if mask else 21)


def test_extra_norm_follows_res5():
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml")
    model = _build(cfg)
    res5 = model.roi_heads.res5
    assert list(dict(res5.named_children()))[-1] == "norm"
    assert isinstance(res5.norm, torch.nn.BatchNorm2d) and res5.norm.num_features == 2048
    x = torch.randn(2, 1024, 8, 8)
    model.eval()
    out = res5(x)
    no_norm = torch.nn.Sequential(*list(res5.children())[:-1])(x)
    assert torch.allclose(out, res5.norm(no_norm))


def test_our_configs_fail_in_plain_detectron2_with_the_entry_point_named():
    from detectron2.config import get_cfg

    for name in ("coco_R_50_C4_1x", "coco_R_50_C4_2x", "voc0712_R_50_C4_24k", "synthetic_R_50_C4"):
        with pytest.raises(KeyError, match="Non-existent config key: REQUIRES_transfer_detection_train_net"):
            get_cfg().merge_from_file(str(CONFIGS / f"{name}.yaml"))
        assert load_config(CONFIGS / f"{name}.yaml").REQUIRES_transfer_detection_train_net is True


def test_bad_config_input_names_the_problem(tmp_path):
    with pytest.raises(DetectionSetupError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(DetectionSetupError, match="Non-existent key: SOLVER.MAX_ITERS.*fix: check"):
        load_config(CONFIGS / "coco_R_50_C4_1x.yaml", ["SOLVER.MAX_ITERS", "10"])
    with pytest.raises(DetectionSetupError, match="KEY VALUE pairs"):
        load_config(CONFIGS / "coco_R_50_C4_1x.yaml", ["SOLVER.MAX_ITER"])


@pytest.mark.parametrize("world, cuda, expected", [(1, False, "BN"), (1, True, "BN"), (2, False, "naiveSyncBN"),
                                                   (8, True, "SyncBN")])
def test_norm_fits_the_world_size(world, cuda, expected):
    assert resolve_norm("SyncBN", world, cuda) == expected
    assert resolve_norm("FrozenBN", world, cuda) == "FrozenBN"


def test_fewer_images_scale_lr_linearly_and_schedule_inversely():
    cfg = load_config(CONFIGS / "coco_R_50_C4_1x.yaml", ["SOLVER.IMS_PER_BATCH", "8"])
    lines = adjust_for_run(cfg, ["SOLVER.IMS_PER_BATCH", "8"], world_size=2, cuda=False)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.01)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS) == (180000, (120000, 160000), 2000)
    assert any("effective batch 8 images (config written for 16): lr 0.01" in line and "4 per process x 2" in line
               for line in lines)
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.DEVICE == "cpu"
    # an explicit BASE_LR is the user's choice and is kept
    cfg = load_config(CONFIGS / "coco_R_50_C4_1x.yaml", ["SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.03"])
    scale_to_batch(cfg, {"SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR"})
    assert cfg.SOLVER.BASE_LR == 0.03 and cfg.SOLVER.MAX_ITER == 180000
    # the protocol batch is left alone; an indivisible batch is an error
    cfg = load_config(CONFIGS / "coco_R_50_C4_1x.yaml")
    adjust_for_run(cfg, [], world_size=8, cuda=True)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (0.02, 90000)
    with pytest.raises(DetectionSetupError, match="not divisible by the world size 3"):
        adjust_for_run(load_config(CONFIGS / "coco_R_50_C4_1x.yaml"), [], world_size=3, cuda=False)


@pytest.mark.parametrize("cuda, native_bf16, kept", [(False, False, False), (False, True, True), (True, False, True)])
def test_cpu_amp_is_turned_off_without_native_bf16(cuda, native_bf16, kept):
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml")
    assert cfg.SOLVER.AMP.ENABLED
    lines = adjust_for_run(cfg, [], world_size=1, cuda=cuda, native_bf16=native_bf16)
    assert cfg.SOLVER.AMP.ENABLED == kept
    assert any("no native bf16" in line for line in lines) == (not kept)


def test_missing_dataset_files_are_named_before_queueing(tmp_path, synthetic_root):
    from transfer.detection.datasets import DatasetFilesError, check_dataset_files
    from transfer.detection.train_net import preflight

    cfg = load_config(CONFIGS / "coco_R_50_C4_1x.yaml", ["INTL.DATA_ROOT", str(tmp_path)])
    with pytest.raises(DatasetFilesError) as e:
        check_dataset_files(cfg)
    msg = str(e.value)
    assert str(tmp_path / "coco" / "annotations" / "instances_train2017.json") in msg
    assert str(tmp_path / "coco" / "val2017") in msg and "DETECTRON2_DATASETS" in msg
    cfg = load_config(CONFIGS / "voc0712_R_50_C4_24k.yaml", ["INTL.DATA_ROOT", str(tmp_path)])
    with pytest.raises(DatasetFilesError, match=r"VOC2012/ImageSets/Main/trainval.txt"):
        check_dataset_files(cfg)

    # detectron2's layout under the data root passes the check
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (tmp_path / "coco" / split).mkdir()
        (tmp_path / "coco" / "annotations" / f"instances_{split}.json").write_text("{}")
    assert len(check_dataset_files(load_config(CONFIGS / "coco_R_50_C4_1x.yaml",
                                               ["INTL.DATA_ROOT", str(tmp_path)]))) == 4

    # a COCO-json set by name + paths, and an unknown name
    coco = synthetic_root / "coco"
    sets = repr([["syn_train", str(coco / "instances_train.json"), str(coco)],
                 ["syn_val", str(tmp_path / "missing.json"), str(coco)]])
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml", ["INTL.COCO_JSON_SETS", sets,
                                                           "DATASETS.TRAIN", "('syn_train',)",
                                                           "DATASETS.TEST", "('syn_val',)"])
    with pytest.raises(DatasetFilesError, match="syn_val: .*missing.json"):
        check_dataset_files(cfg)
    with pytest.raises(DetectionSetupError, match="unknown dataset name"):
        check_dataset_files(load_config(CONFIGS / "synthetic_R_50_C4.yaml", ["DATASETS.TEST", "('shapes_val',)"]))
    with pytest.raises(DetectionSetupError, match="MODEL.WEIGHTS .*does not exist"):
        preflight(CONFIGS / "synthetic_R_50_C4.yaml", ["INTL.COCO_JSON_SETS", repr([
            ["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
            ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]]),
            "MODEL.WEIGHTS", str(tmp_path / "w.pkl")])


def test_registered_coco_json_set_loads(synthetic_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from transfer.detection.datasets import register_datasets

    coco = synthetic_root / "coco"
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml", ["INTL.COCO_JSON_SETS", repr([
        ["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
        ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]])])
    register_datasets(cfg)
    register_datasets(cfg)  # re-registering (a second run in the same process) is fine
    val = DatasetCatalog.get("synthetic_coco_val")
    n_val = len(json.loads((coco / "instances_val.json").read_text())["images"])
    assert len(val) == n_val and Path(val[0]["file_name"]).is_file()
    assert MetadataCatalog.get("synthetic_coco_val").thing_classes == ["circle", "square", "triangle"]


def test_weight_keys_are_sorted_into_expected_new_and_backbone_problems():
    from transfer.detection.weights import classify_incompatible

    model = ["backbone.stem.conv1.weight", "backbone.res4.0.conv1.weight", "roi_heads.res5.0.conv1.weight",
             "roi_heads.res5.norm.weight", "proposal_generator.rpn_head.conv.weight",
             "roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_head.predictor.weight",
             "backbone.stem.conv1.norm.num_batches_tracked"]
    ok = classify_incompatible(model, model[3:], ["fc.weight"], [])
    assert ok.ok and ok.loaded == 3 and ok.unused == ["fc.weight"]
    assert sorted(ok.expected_new) == sorted(model[3:7])
    bad = classify_incompatible(model, ["backbone.res4.0.conv1.weight"] + model[3:],
                                [], [("roi_heads.res5.0.conv1.weight", (1,), (2,))])
    assert not bad.ok and bad.missing_backbone == ["backbone.res4.0.conv1.weight"]
    assert bad.wrong_shape_backbone == [("roi_heads.res5.0.conv1.weight", (1,), (2,))]


def test_wrong_weights_stop_the_run_at_start(tmp_path, synthetic_root):
    """A weights file without res4 keys: WeightsMismatchError before any iteration, nothing trained."""
    import torchvision

    from transfer.convert import detectron2_name
    from transfer.detection.train_net import main, run_task
    from transfer.detection.weights import WeightsMismatchError

    sd = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    model = {detectron2_name(k): v.numpy() for k, v in sd.items()}
    model = {k: v for k, v in model.items() if k and not k.startswith("res4.")}
    assert model and not any(k.startswith("res4.") for k in model)
    path = tmp_path / "no_res4.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "test", "matching_heuristics": True}))
    opts = [*synthetic_sets(synthetic_root), "MODEL.WEIGHTS", str(path), "SOLVER.MAX_ITER", "2"]
    out = tmp_path / "run"
    with pytest.raises(WeightsMismatchError) as e:
        run_task(str(CONFIGS / "synthetic_R_50_C4.yaml"), opts, str(out))
    msg = str(e.value)
    assert "backbone key(s) missing" in msg and "backbone.res4.0.conv1.weight" in msg and "intl-convert" in msg
    assert not list(out.glob("model_*.pth")) and not (out / "COMPLETE").exists()
    assert "d2.engine.train_loop INFO: Starting training" not in (out / "log.txt").read_text()
    # the CLI prints the message and exits non-zero
    assert main(["--config-file", str(CONFIGS / "synthetic_R_50_C4.yaml"), "--output-dir", str(out)] + opts) == 2


def test_aggregate_mean_std_and_incomplete_seeds(tmp_path):
    from transfer.detection.aggregate import aggregate, seed_runs
    from transfer.detection.report import eval_to_results

    values = {0: (50.0, 30.0, 31.0), 1: (52.0, 31.0, 33.0), 2: (51.0, 32.0, 35.0)}
    for seed, (ap50, ap, ap75) in values.items():
        res = eval_to_results({"bbox": {"AP50": ap50, "AP": ap, "AP75": ap75, "APl": float("nan")},
                               "segm": {"AP50": ap50 - 2, "AP": ap - 2, "AP75": ap75 - 2}})
        assert res["bbox"]["APl"] is None
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(res))
    (tmp_path / "seed3").mkdir()  # still running
    s = aggregate(tmp_path)
    assert s["seeds"] == [0, 1, 2] and s["incomplete"] == ["seed3"]
    assert s["mean"]["bbox"]["AP50"] == pytest.approx(51.0)
    assert s["std"]["bbox"]["AP75"] == pytest.approx(statistics.stdev([31.0, 33.0, 35.0]))
    assert s["mean"]["segm"]["AP"] == pytest.approx(29.0)
    md = (tmp_path / "results.md").read_text()
    assert "| 51.0 ± 1.0 | 31.0 ± 1.0 | 33.0 ± 2.0 | 49.0 ± 1.0 | 29.0 ± 1.0 | 31.0 ± 2.0 |" in md
    assert "seed3" in md
    assert [str(d.name) for d, _ in seed_runs(tmp_path, 3)] == ["seed0", "seed1", "seed2"]
    assert seed_runs(tmp_path, 2)[1][1] == ["SEED", "1"]
    with pytest.raises(DetectionSetupError, match="no seed"):
        aggregate(tmp_path / "seed3")


def test_preflight_checks_the_batch_against_the_world_size(synthetic_root):
    from transfer.detection.train_net import preflight

    opts = synthetic_sets(synthetic_root)
    assert preflight(CONFIGS / "synthetic_R_50_C4.yaml", opts, world_size=2).SOLVER.IMS_PER_BATCH == 4
    with pytest.raises(DetectionSetupError, match="IMS_PER_BATCH=4 is not divisible by the world size 3"):
        preflight(CONFIGS / "synthetic_R_50_C4.yaml", opts, world_size=3)


def test_evaluator_scores_ground_truth_as_perfect(synthetic_root, tmp_path):
    """The evaluator the trainer builds (COCOEvaluator, bbox + segm): AP 100 for the ground truth itself, 0 when
    every class is wrong."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import annotations_to_instances
    from detectron2.structures import Instances

    from transfer.detection.datasets import register_datasets
    from transfer.detection.report import eval_to_results
    from transfer.detection.trainer import Trainer

    coco = synthetic_root / "coco"
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml", ["INTL.COCO_JSON_SETS", repr([
        ["synthetic_coco_train", str(coco / "instances_train.json"), str(coco)],
        ["synthetic_coco_val", str(coco / "instances_val.json"), str(coco)]]), "OUTPUT_DIR", str(tmp_path)])
    register_datasets(cfg)
    evaluator = Trainer.build_evaluator(cfg, "synthetic_coco_val")

    def evaluate(shift_class: int) -> dict:
        evaluator.reset()
        for d in DatasetCatalog.get("synthetic_coco_val"):
            size = (d["height"], d["width"])
            gt = annotations_to_instances(d["annotations"], size, mask_format="bitmask")
            pred = Instances(size, pred_boxes=gt.gt_boxes, scores=torch.ones(len(gt)),
                             pred_classes=(gt.gt_classes + shift_class) % 3, pred_masks=gt.gt_masks.tensor)
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": pred}])
        return eval_to_results(evaluator.evaluate())

    perfect, wrong_class = evaluate(0), evaluate(1)
    for task in ("bbox", "segm"):
        assert perfect[task]["AP50"] == pytest.approx(100.0) and perfect[task]["AP"] > 95.0, perfect[task]
        assert wrong_class[task]["AP50"] == pytest.approx(0.0), wrong_class[task]


def test_trainer_hooks_cap_checkpoints_and_log_every_loss(tmp_path, synthetic_root):
    from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PreciseBN

    from transfer.detection.datasets import register_datasets
    from transfer.detection.trainer import LossLog, Trainer

    assert load_config(CONFIGS / "coco_R_50_C4_1x.yaml").INTL.MAX_CHECKPOINTS_TO_KEEP == 2
    cfg = load_config(CONFIGS / "synthetic_R_50_C4.yaml", [
        *synthetic_sets(synthetic_root),
        "INTL.MAX_CHECKPOINTS_TO_KEEP", "3", "OUTPUT_DIR", str(tmp_path)])
    adjust_for_run(cfg, [], world_size=1, cuda=False, native_bf16=True)  # keeps SOLVER.AMP on, on any CPU
    register_datasets(cfg)
    trainer = Trainer(cfg)
    kinds = {type(h): h for h in trainer._hooks}
    assert kinds[PeriodicCheckpointer].max_to_keep == 3
    assert PreciseBN in kinds and EvalHook in kinds and isinstance(trainer._hooks[-1], LossLog)
    assert type(trainer._trainer).__name__ == "CPUAutocastTrainer"  # SOLVER.AMP on CPU: bf16 autocast



@pytest.mark.parametrize("name,content", [("garbage.pkl", b"\x80\x04not a pickle at all"), ("empty.pkl", b""),
                                          ("garbage.pth", b"PK\x03\x04 torn zip")])
def test_garbage_weights_file_is_named_with_the_fix(tmp_path, synthetic_root, name, content):
    """MODEL.WEIGHTS that is not a weights file: the path and the fix and exit 2, not an UnpicklingError."""
    from common.errors import UserError
    from transfer.detection.train_net import main, run_task

    path = tmp_path / name
    path.write_bytes(content)
    opts = [*synthetic_sets(synthetic_root), "MODEL.WEIGHTS", str(path), "SOLVER.MAX_ITER", "2"]
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run_task(str(CONFIGS / "synthetic_R_50_C4.yaml"), opts, str(out))
    print(f"{type(e.value).__name__}: {e.value}")
    assert f"{path} could not be read as detectron2 weights" in str(e.value) and "intl-convert" in str(e.value)
    assert not list(out.glob("model_*.pth")) and not (out / "COMPLETE").exists()
    assert main(["--config-file", str(CONFIGS / "synthetic_R_50_C4.yaml"), "--output-dir", str(out)] + opts) == 2
