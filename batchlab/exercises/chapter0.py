"""The check of chapter 0's exercise: reading the largest batch that fits off the explorer's memory panel."""

from __future__ import annotations

from .turn import your_turn


def check_largest_batch(
    answer, *, model: str = "cnn_bn", profile: str = "GPU 8 GiB (simulated)", optimizer: str = "sgd"
) -> None:
    """Chapter 0's exercise: the largest batch of ``model`` that fits ``profile``, as the memory panel names it.

    ``None`` (the placeholder in the notebook) prints what to do; a wrong answer raises ``AssertionError``
    with a hint that does not give the answer away; a right one prints why it is right. The answer is
    computed by :func:`batchlab.explorer.largest_batch_for`, the function the panel itself calls.
    """
    if your_turn(
        f"choose the model {model} and the device '{profile}' in the explorer, and read the largest batch that fits.",
        answer,
    ):
        return
    from ..explorer import largest_batch_for, memory_input_shape  # matplotlib loads only when a check runs

    expected = largest_batch_for(model, profile, optimizer=optimizer)
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"the answer is a number of samples: a whole number (an int), got {answer!r}"
    )
    assert answer == expected, (
        f"{answer} is not right. Set the model to {model} and the device to '{profile}', then read the number "
        f"the memory panel names under the bars ('The largest batch that fits in one step'), once its search "
        f"has finished."
    )
    print(
        f"Correct: {expected} images of {'x'.join(map(str, memory_input_shape(model)))} per step, the largest "
        f"batch whose estimated step fits with max_batch_size's margin (room for one more block of its largest tensor)."
    )
