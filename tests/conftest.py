"""Shared fixtures: synthetic ScanNet-format scenes, the real-data root, markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scene3d.constants import REAL_DATA_ENV

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL_DATA = REPO.parent / "shared" / "data" / "real"


def real_data_root() -> Path:
    return Path(os.environ.get(REAL_DATA_ENV, DEFAULT_REAL_DATA))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real ScanNet / ScanRefer / ReferIt3D subsets (``$SCENE3D_REAL_DATA``).

    Skips with a reason where absent; CI sets ``SCENE3D_REQUIRE_REAL_DATA=1`` so that becomes a failure.
    """
    root = real_data_root()
    if not (root / "SOURCES.md").exists():
        msg = f"real data not found at {root} (set {REAL_DATA_ENV} to the shared data/real folder)"
        if os.environ.get("SCENE3D_REQUIRE_REAL_DATA") == "1":
            pytest.fail(msg + "; SCENE3D_REQUIRE_REAL_DATA=1 forbids skipping")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic ScanNet-format dataset (raw layout), generated once per test session."""
    from data_prep.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, num_scenes=3, seed=7, preset="tiny", val_fraction=0.34)
    return out


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
