"""Shared test set-up: keep torch on the machine's two cores and tests independent of each other."""

import pytest
import torch

# One CPU thread, as batchlab.setup() gives the notebooks: on a shared machine, torch's threads
# waiting for each other make small operations many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state and leaves nothing behind."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
