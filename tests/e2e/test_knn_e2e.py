"""The k-NN stage end to end: results on disk, a complete run returns at once, 1 and 2 processes agree."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from stage_fixtures import free_port, knn_cfg


def _knn_worker(rank, world, port, data_root, run_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from pathlib import Path

    from common.distributed import cleanup
    from transfer import knn

    torch.set_num_threads(1)
    out = knn.run(knn_cfg(Path(data_root), Path(run_dir)))
    assert (out is not None) == (rank == 0)
    cleanup()


def test_knn_stage_one_and_two_processes_agree(tiny_synthetic, tmp_path):
    import json

    from transfer import knn

    res = knn.run(knn_cfg(tiny_synthetic, tmp_path / "one"))
    on_disk = json.loads((tmp_path / "one" / "results.json").read_text())
    assert on_disk["top1"] == res["top1"] and on_disk["k"] == 5 and on_disk["weighted"]["k"] == 20
    assert on_disk["n_train"] == 120 and on_disk["n_val"] == 40 and on_disk["feature_dim"] == 512
    assert on_disk["epochs"] == 0 and on_disk["source_checkpoint"] is None
    assert (tmp_path / "one" / "COMPLETE").exists() and any((tmp_path / "one" / "tb").iterdir())
    assert "weighted k-NN k=20" in (tmp_path / "one" / "results.md").read_text()
    again = knn.run(knn_cfg(tiny_synthetic, tmp_path / "one"))
    assert again["already_complete"] and again["top1"] == res["top1"]
    # Two gloo processes: each extracts its shard, the gathered features give the same votes.
    mp.spawn(_knn_worker, args=(2, free_port(), str(tiny_synthetic), str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["n_train"] == 120 and two["n_val"] == 40
    assert two["provenance"]["world_size"] == 2 and on_disk["provenance"]["world_size"] == 1
    # Same features up to float summation order: at most one of the 40 votes may flip.
    assert two["top1"] == pytest.approx(res["top1"], abs=2.5)
    assert two["weighted"]["top1"] == pytest.approx(res["weighted"]["top1"], abs=2.5)


def test_unreadable_images_are_left_out_counted_over_ranks_and_listed(tiny_synthetic, tmp_path):
    """3 unreadable training and 2 validation images, 2 gloo processes: the k-NN leaves them out (the same
    result as with the files deleted), counts each file once over both ranks, lists them in the run folder."""
    import json
    import shutil

    from transfer import knn

    corrupt, deleted = tmp_path / "corrupt", tmp_path / "deleted"
    for root in (corrupt, deleted):
        shutil.copytree(tiny_synthetic / "classification", root / "classification")
    files = sorted((corrupt / "classification" / "train").rglob("*.jpg"))[:3] + \
        sorted((corrupt / "classification" / "val").rglob("*.jpg"))[:2]
    assert len(files) == 5, "the tiny set changed its image format"
    for f in files:
        f.write_bytes(b"not an image")
        (deleted / f.relative_to(corrupt)).unlink()
    clean = knn.run(knn_cfg(deleted, tmp_path / "clean"))
    mp.spawn(_knn_worker, args=(2, free_port(), str(corrupt), str(tmp_path / "bad")), nprocs=2, join=True)
    bad = json.loads((tmp_path / "bad" / "results.json").read_text())
    u = bad["unreadable_images"]
    listed = (tmp_path / "bad" / "unreadable_images.txt").read_text().splitlines()
    print(f"\nunreadable: {u['counts']}, listed {len(listed)}; n_train {bad['n_train']} n_val {bad['n_val']}; "
          f"top-1 {bad['top1']:.2f} vs {clean['top1']:.2f} with the files deleted")
    assert u["counts"] == {"train": 3, "val": 2} and (bad["n_train"], bad["n_val"]) == (117, 38)
    assert sorted(p for split in ("train", "val") for p in u["files"][split]) == sorted(map(str, files))
    assert sorted(line.split("\t")[1] for line in listed) == sorted(map(str, files))
    assert (bad["top1"], bad["top5"], bad["weighted"]) == (clean["top1"], clean["top5"], clean["weighted"])
