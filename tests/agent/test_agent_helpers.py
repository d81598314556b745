"""The agent tests' helpers (tests/agent_fixtures.py) themselves."""

from __future__ import annotations

import io

import numpy as np
from agent_fixtures import NUM_CLASSES, build_cnn, dataset, direct_topk, npy_bytes


def test_cnn_is_deterministic_and_has_ten_classes() -> None:
    assert build_cnn() == build_cnn()
    topk = direct_topk(build_cnn(), dataset(4), k=NUM_CLASSES)
    assert topk.shape == (4, NUM_CLASSES)
    assert sorted(topk[0].tolist()) == list(range(NUM_CLASSES))


def test_npy_round_trip() -> None:
    data = dataset(3)
    assert np.array_equal(np.load(io.BytesIO(npy_bytes(data)), allow_pickle=False), data)
