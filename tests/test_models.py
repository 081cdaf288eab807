import pytest
import torch

import batchlab
from batchlab.models import MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_classify_their_input(name):
    in_shape = {"resnet18": (3, 32, 32), "transformer": (16,)}.get(name, (1, 28, 28))
    model = batchlab.build_model(name, in_shape=in_shape, num_classes=7)
    inputs = torch.zeros(2, *in_shape, dtype=torch.long if name == "transformer" else torch.float32)
    assert model(inputs).shape == (2, 7)


def test_transformer_names_what_it_expects():
    model = batchlab.build_model("transformer", in_shape=(16,))
    with pytest.raises(ValueError, match=r"token ids of shape \(batch, up to 16\) and dtype torch.long"):
        model(torch.zeros(2, 16))


def test_models_match_the_gpu_reference_architectures():
    # batchlab/data/gpu_memory_h100.json describes these models; the parameter counts follow from it.
    assert batchlab.count_parameters(batchlab.build_model("mlp", in_shape=(1, 28, 28))) == 669_706
    assert batchlab.count_parameters(batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))) == 421_834
    assert batchlab.count_parameters(batchlab.build_model("resnet18")) == 11_181_642


def test_seed_fixes_weights_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a = batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=1)
    b = batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resnet18_adapts_to_grey_images():
    model = batchlab.build_model("resnet18", in_shape=(1, 32, 32))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="vgg"), "name must be one of 'mlp', 'cnn', 'cnn_bn', 'resnet18', 'transformer', got 'vgg'"),
        (dict(name="mlp", in_shape=(28, 28)), r"in_shape must be \(channels, height, width\)"),
        (dict(name="transformer", in_shape=(1, 28, 28)), r"in_shape must be \(sequence_length,\)"),
        (dict(name="cnn", in_shape=(1, 2, 2)), "height and width of at least 4"),
        (dict(name="mlp", num_classes=1), "num_classes must be an int >= 2"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batchlab.build_model(**kwargs)
