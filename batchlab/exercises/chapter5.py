"""The check of chapter 5's exercise: a forward hook that keeps a number, not a tensor."""

from __future__ import annotations

import math

from ..leaks import leak_check
from .turn import your_turn


def check_hook_fix(hook, module, step, kept: list) -> None:
    """Check exercise 1 of chapter 5: a forward hook that keeps only the mean of ``module``'s output.

    The check registers ``hook`` on ``module`` itself, runs :func:`leak_check` on ``step`` (one training
    step of the model that contains ``module``) and removes the hook again, whatever happens, so the
    model is left as it was. It passes when nothing grows *and* the hook appended to ``kept`` one Python
    float per forward pass, equal to the mean of the module's output: a hook that keeps nothing, a
    step that never calls the hook, or a hook that keeps a tensor does not pass. ``None`` prints the task.
    """
    if your_turn(
        "write a forward hook that appends the mean of the layer's output to the list, as a Python "
        "float, and pass it here.",
        hook,
    ):
        return
    if not callable(hook):
        raise TypeError(f"hook must be a function (module, inputs, output) -> None, got {hook!r}")
    if not isinstance(kept, list):
        raise TypeError(f"kept must be the list your hook appends to, got {type(kept).__name__}")
    expected, start = [], len(kept)
    handles = [
        module.register_forward_hook(hook),
        module.register_forward_hook(lambda _module, _inputs, output: expected.append(output.detach().mean().item())),
    ]  # what the learner's hook should keep, for comparison
    try:
        report = leak_check(step, iterations=10, label="your hook", progress=False)
    except Exception as error:  # the learner's hook: say what happened, as an AssertionError
        raise AssertionError(f"the step raised {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    values = kept[start:]
    del kept[start:]  # the check's own calls leave nothing behind in the learner's list
    assert expected, "the step never ran the layer: pass the training step of the model that contains it"
    assert not report.leaking, f"still growing: {report.message}. What does your hook keep, and what does it hold?"
    assert len(values) == len(expected), (
        f"your hook should append one value to the list per forward pass: {len(expected)} passes, "
        f"{len(values)} values appended"
    )
    kinds = sorted({type(v).__name__ for v in values if not isinstance(v, float)})
    assert not kinds, f"keep a Python float (tensor.item() gives one), got {', '.join(kinds)}"
    assert all(math.isclose(v, e, rel_tol=1e-5, abs_tol=1e-6) for v, e in zip(values, expected)), (
        "the values should be the mean of the layer's output over all its elements"
    )
    print(f"Correct: {report.message}, and the hook kept one float per step.")
