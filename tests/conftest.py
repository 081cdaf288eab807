"""Shared test set-up: keep torch on the machine's two cores and tests independent of each other."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state and leaves nothing behind."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
