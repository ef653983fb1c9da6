"""Snapshots (``train.keep_every_epochs``): ``epoch_<N>.pth`` beside ``last.pth``, with a retention limit,
accepted by the converter and the evaluations like a finished checkpoint."""

from __future__ import annotations

from common.backbone_weights import read_backbone_weights
from common.checkpoint import LAST_NAME, load_checkpoint, snapshot_files
from stage_fixtures import build_engine, compose_pretrain, tiny_overrides
from transfer.classification import check_finished
from transfer.convert import convert


def test_snapshots_at_their_epochs_retention_and_evaluable(tiny_synthetic, tmp_path):
    run = tmp_path / "run"
    cfg = compose_pretrain(tiny_overrides(tiny_synthetic, run, "optim.epochs=5", "train.ckpt_every_steps=0",
                                          "train.keep_every_epochs=2", "train.keep_snapshots=1"))
    engine = build_engine(cfg)
    spe = engine.steps_per_epoch
    kept = []
    save = engine.save

    def recording_save(finished=False, snapshot=False):
        save(finished=finished, snapshot=snapshot)
        kept.append(sorted(n for n, _ in snapshot_files(run)))

    engine.save = recording_save
    engine.fit()
    print(f"{spe} steps per epoch, 5 epochs, every 2, keep 1: snapshots after each save {kept}")
    # epochs 2 and 4 are snapshotted (5, the last, is last.pth); keep_snapshots=1 then removes epoch_2
    assert [2] in kept and kept[-1] == [4]
    (epoch, path), = snapshot_files(run)
    snap = load_checkpoint(path)
    assert (snap["step"], snap["snapshot"], snap["finished"]) == (4 * spe, True, False)
    assert load_checkpoint(run / LAST_NAME)["finished"] is True

    weights = read_backbone_weights(path)
    assert weights.identity["snapshot"] is True and weights.identity["step"] == 4 * spe
    check_finished(weights.identity, allow_unfinished=False)  # evaluations take it like a finished run
    convert(path, tmp_path / "epoch_4_r18.pth")
    assert (tmp_path / "epoch_4_r18.pth").is_file()
