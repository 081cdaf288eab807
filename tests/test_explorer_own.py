"""The batch-size explorer on a learner's own model and on any GPU size or card (issue 14)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchlab
from batchlab import datasets
from batchlab import explorer as ex
from batchlab.widgets import BatchSizeExplorer


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(100, 16), nn.Linear(16, 100)

    def forward(self, ids):
        return self.head(self.embed(ids))


def tokens(n):
    return torch.empty(n, 32, dtype=torch.long, device="meta"), torch.empty(n, 32, dtype=torch.long, device="meta")


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@pytest.fixture(scope="module")
def small_digits():
    return datasets.digits(train=False)


def test_gpu_profiles_for_cards_and_sizes():
    profiles = ex.device_profiles()
    assert ex.profile_for(12, profiles) == "GPU 12 GiB (simulated)"
    assert profiles["GPU 12 GiB (simulated)"].budget == 12 * 2**30 - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    assert ex.profile_for("8GiB", profiles) == "GPU 8 GiB (simulated)"  # the existing profile, not a twin
    assert ex.profile_for("rtx 3060", profiles) == "GPU 12 GiB (simulated)"  # the same size as the one above
    name = ex.profile_for("T4", profiles)
    assert name == "GPU T4 (simulated)" and profiles[name].capacity == 15 * 2**30
    with pytest.raises(ValueError, match="not a card"):
        ex.profile_for("tpu", profiles)


def test_own_model_memory_equals_estimate_memory_and_any_gpu_is_accepted(small_digits):
    model = TinyLM()
    widget = BatchSizeExplorer(
        small_digits, model=model, make_batch=tokens, loss_fn=lm_loss, gpu="12GiB", batch_size=64
    )
    try:
        state = widget.state
        assert state["model"] == "your TinyLM" and state["profile"] == "GPU 12 GiB (simulated)"
        expected = batchlab.estimate_memory(model, tokens(64), loss_fn=lm_loss)
        assert state["peak_bytes"] == expected.peak_bytes
        assert widget.panels == ("memory",)
        state = widget.set(profile=6)  # a size typed in: a new GPU, offered in the list from now on
        assert state["profile"] == "GPU 6 GiB (simulated)" and "GPU 6 GiB (simulated)" in widget.profile.options
        assert state["message"] == ""
        state = widget.set(model="cnn")  # the course models stay in the list
        assert state["model"] == "cnn"
    finally:
        widget.close()


def test_own_model_with_a_loss_that_does_not_suit_it_is_refused(small_digits):
    with pytest.raises(ValueError, match="pass loss_fn"):
        BatchSizeExplorer(small_digits, model=TinyLM(), make_batch=tokens)
    with pytest.raises(TypeError, match="make_batch must be a function"):
        BatchSizeExplorer(small_digits, model=TinyLM(), make_batch=None)
    with pytest.raises(ValueError, match="make_batch and loss_fn are for your own model"):
        BatchSizeExplorer(small_digits, model="cnn", make_batch=tokens)
