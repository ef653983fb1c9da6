"""Pretraining on data without labels, end to end: a flat folder, a file list and STL-10's unlabeled split train,
the monitor turns itself off (STL-10: its k-NN votes from the labelled train split), the launcher's check counts
STL-10's images from the file sizes."""

import json
import logging

from stage_fixtures import compose_pretrain, tiny_overrides, write_stl10_binary


def test_flat_folder_pretrains_without_a_monitor_and_a_file_list_passes_the_check(tiny_synthetic, tmp_path, caplog):
    from pretrain.train import preflight, run

    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "folder", "data.kind=folder",
                                          "train.max_steps=2", "data.val_split=val"))
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        run(cfg)
    assert (tmp_path / "folder" / "COMPLETE").exists()
    rows = [json.loads(line) for line in (tmp_path / "folder" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("probe_train_top1" in r or "knn_top1" in r for r in rows)
    assert "no labels" in caplog.text and "online probe is off" in caplog.text
    listing = tmp_path / "list.txt"
    root = tiny_synthetic / "classification" / "train"
    listing.write_text("".join(f"{p.relative_to(root)}\n" for p in sorted(root.rglob("*.jpg"))[:32]))
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, tmp_path / "list", "data.kind=filelist",
                                          f"data.file_list={listing}", "train.max_steps=2"))
    assert preflight(cfg).data.kind == "filelist"  # the launcher's check reads the list (the reader's own
    # tests: tests/common/test_datasets.py); the engine builds its set through the same build_dataset


def test_stl10_unlabeled_pretrains_with_the_knn_monitor_on_the_labelled_splits(tmp_path):
    from pretrain.train import preflight, run

    write_stl10_binary(tmp_path / "stl10", n_train=20, n_test=10, n_unlabeled=32)
    overrides = [o for o in tiny_overrides(tmp_path, tmp_path / "run") if not o.startswith("data.root=")]
    cfg = compose_pretrain(["pretrain/data=stl10", f"data.root={tmp_path / 'stl10'}", *overrides, "train.max_steps=2",
                            "data.eval_resize=16", "data.eval_crop=16", "train.knn_every=1"])
    assert preflight(cfg).data.split == "unlabeled"
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert knn and knn[-1]["knn_train_images"] == 20 and not any("probe_train_top1" in r for r in rows)
