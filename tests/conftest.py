"""Shared fixtures: a tiny model config and a tiny demo dataset, both fast on 2 CPU cores."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"

# A config that trains in seconds: small CNN, small images, one short epoch.
TINY_ARGS = [
    "config=configs/demo.yaml",
    "model.backbone=resnet18",
    "model.embed_dim=32",
    "data.img_size=32",
    "data.num_workers=0",
    "train.epochs=1",
    "train.batch_size=16",
    "embed.batch_size=32",
    "device=cpu",
    "report.enabled=false",  # the report has its own tests; the end-to-end test turns it on
]


@pytest.fixture
def tiny_cfg_args() -> list[str]:
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the competition layout, generated once per test session."""
    from src.demo_data import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, seed=0, n_ids=8, min_images=6, max_images=12, image_size=64,
                          overwrite=True)
    return out
