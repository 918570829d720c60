"""Shared fixtures: a tiny model config and a tiny demo dataset, both fast on 2 CPU cores.
Shared plain helpers (the tiny data set, the fake experiment builder) are in tests/helpers.py."""

from pathlib import Path

import pytest

from tests.helpers import TINY_ARGS


@pytest.fixture
def tiny_cfg_args() -> list[str]:
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in the competition layout, generated once per test session."""
    from jaguar_reid.data.demo import generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, seed=0, n_ids=8, min_images=6, max_images=12, image_size=64,
                          overwrite=True)
    return out
