"""The "your turn" step that every exercise check shares.

A notebook's exercise cell first calls its check with ``None`` in place of the learner's answer. The
check then prints the task, instead of failing, and returns; once the learner has filled the answer in,
the same cell checks it.
"""

from __future__ import annotations


def your_turn(task: str, *answers) -> bool:
    """Print ``Your turn: <task>`` and return True when any of ``answers`` is still ``None``.

    Every ``check_...`` starts with ``if your_turn(task, answer): return``, so the placeholder of the
    notebook prints what to do, never an error.
    """
    if any(answer is None for answer in answers):
        print(f"Your turn: {task}")
        return True
    return False
