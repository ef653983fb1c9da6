import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Two cores shared by the test process and the ranks it spawns: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("INTL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    """The default embedded datasets (built by `make data`, regenerated here if missing)."""
    from pretrain.synthetic import SyntheticSpec, generate

    root = ROOT / "data" / "synthetic"
    generate(root, SyntheticSpec())
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A very small copy of the embedded datasets for fast end-to-end tests."""
    from pretrain.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("tiny_synthetic")
    generate(root, SyntheticSpec(cls_size=32, cls_train_per_class=12, cls_val_per_class=4,
                                 det_size=96, det_train_images=8, det_val_images=4))
    return root
