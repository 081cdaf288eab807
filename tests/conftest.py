"""Shared test set-up: keep torch on the machine's two cores and tests independent of each other."""

import os

# Quiet progress bars in the unit tests: tqdm (>= 4.66) reads TQDM_* variables once, when it is imported,
# so a function called with progress=True draws nothing here (tests/test_progress.py checks the bars with a
# stand-in). The variable is removed again at once: the notebook kernels that nbval starts in the same
# pytest run inherit this process's environment, and they must draw the bars the committed outputs show.
os.environ["TQDM_DISABLE"] = "1"
import tqdm.auto  # noqa: E402, F401

del os.environ["TQDM_DISABLE"]

import pytest  # noqa: E402
import torch  # noqa: E402

# One CPU thread, as batchlab.setup() gives the notebooks: on a shared machine, torch's threads
# waiting for each other make small operations many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state and leaves nothing behind."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def ctrl_c():
    """Python's Ctrl-C handler for the test, whatever this process inherited: a shell without job control
    starts background commands (``make test &``) with SIGINT ignored, and Python then installs no handler."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)
