"""transfer.embed end to end on the tiny synthetic set: the dump written by 2 processes equals one process's,
row by row, in both formats; transfer.knn reads it instead of recomputing (same votes as a computing run, k in
{10, 20, 100, 200} in one pass); STL-10's binary release through the k-NN and embed stages."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.config import compose_config
from stage_fixtures import free_port, knn_cfg, write_stl10_binary


def embed_cfg(data_root: Path, run_dir: Path, *extra: str):
    return compose_config("embed", ["eval/data=synthetic", f"data.root={data_root / 'classification'}",
                                    f"run_dir={run_dir}", "data.workers=0", "batch_size=40", "model.arch=resnet18",
                                    *extra])


def _embed_worker(rank, world, port, data_root, run_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from common.distributed import cleanup
    from transfer import embed

    torch.set_num_threads(1)
    out = embed.run(embed_cfg(Path(data_root), Path(run_dir)))
    assert (out is not None) == (rank == 0)
    cleanup()


def test_features_written_by_two_processes_are_one_process_rows_and_knn_reuses_them(tiny_synthetic, tmp_path):
    from transfer import embed, knn
    from transfer.embed import read_embedding

    one = embed.run(embed_cfg(tiny_synthetic, tmp_path / "one"))
    assert one["splits"]["train"]["n"] == 120 and one["splits"]["val"]["n"] == 40
    assert one["splits"]["train"]["dim"] == 512 and (tmp_path / "one" / "COMPLETE").exists()
    f1, y1, files1, meta = read_embedding(tmp_path / "one", "train")
    assert f1.dtype == torch.float32 and y1.dtype == torch.int64 and f1.shape == (120, 512)
    assert Path(files1[0]).parent.name == meta["splits"]["train"]["classes"][0]  # file names in dataset order
    assert y1.tolist() == [meta["splits"]["train"]["classes"].index(Path(f).parent.name) for f in files1]
    assert np.load(tmp_path / "one" / "features_val.npy").shape == (40, 512)

    mp.spawn(_embed_worker, args=(2, free_port(), str(tiny_synthetic), str(tmp_path / "two")), nprocs=2, join=True)
    f2, y2, files2, meta2 = read_embedding(tmp_path / "two", "train")
    assert meta2["world_size"] == 2 and files2 == files1 and torch.equal(y2, y1)
    assert torch.allclose(f2, f1, rtol=1e-4, atol=1e-5)  # every row where one process put it

    tv = embed.run(embed_cfg(tiny_synthetic, tmp_path / "pt", "format=torch", "split=val"))
    saved = torch.load(tmp_path / "pt" / "features_val.pt", weights_only=True)
    assert list(tv["splits"]) == ["val"] and saved["features"].shape == (40, 512)
    assert torch.allclose(saved["features"], read_embedding(tmp_path / "one", "val")[0], rtol=1e-4, atol=1e-5)

    computed = knn.run(knn_cfg(tiny_synthetic, tmp_path / "knn_computed"))
    reused = knn.run(knn_cfg(tiny_synthetic, tmp_path / "knn_reused", f"knn.features={tmp_path / 'one'}",
                             "data.root=/nonexistent"))  # no image is read
    assert reused["features_from"] == str(tmp_path / "one") and reused["n_train"] == 120
    assert reused["top1"] == computed["top1"] and reused["weighted"] == computed["weighted"]
    assert set(reused["weighted_by_k"]) == {"10", "20", "100", "200"}
    assert reused["weighted_by_k"]["20"]["top1"] == reused["weighted"]["top1"]
    assert reused["weighted_by_k"] == computed["weighted_by_k"]
    assert reused["source"]["features"] == str(tmp_path / "one")
    on_disk = json.loads((tmp_path / "knn_reused" / "results.json").read_text())
    assert on_disk["weighted_by_k"]["200"]["top1"] == reused["weighted_by_k"]["200"]["top1"]
    with pytest.raises(ValueError, match="knn.features .* pass it or weights=, not both"):
        knn.validate_config(knn_cfg(tiny_synthetic, tmp_path / "x", f"knn.features={tmp_path / 'one'}",
                                    f"weights={tmp_path / 'one' / 'features_val.npy'}"))
    with pytest.raises(Exception, match="no 'train' features"):
        knn.run(knn_cfg(tiny_synthetic, tmp_path / "knn_pt", f"knn.features={tmp_path / 'pt'}"))


def test_stl10_binary_release_through_knn_and_embed(tmp_path):
    from transfer import embed, knn

    write_stl10_binary(tmp_path / "stl10", n_train=40, n_test=20, n_unlabeled=10)
    common = [f"data.root={tmp_path / 'stl10'}", "data.workers=0", "model.arch=resnet18"]
    res = knn.run(compose_config("knn", ["eval/knn=stl10", f"run_dir={tmp_path / 'knn'}", "knn.batch_size=20",
                                         *common]))
    assert res["n_train"] == 40 and res["n_val"] == 20 and res["num_classes"] == 10
    # the written images have class-coloured pixels: even a random backbone's k-NN is far above chance (10%)
    assert res["top1"] > 30
    out = embed.run(compose_config("embed", ["eval/data=stl10", f"run_dir={tmp_path / 'emb'}", "batch_size=20",
                                             "split=val", *common]))
    assert out["splits"]["val"]["n"] == 20
    assert (tmp_path / "emb" / "files_val.txt").read_text().splitlines()[:2] == ["stl10/test/0", "stl10/test/1"]
