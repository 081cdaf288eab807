"""The checks behind the chapters' exercises, one module per chapter, every check re-exported here.

Each ``check_...`` function takes the learner's answer. ``None`` (the placeholder in the notebook)
prints what to do (:func:`your_turn`, shared by every check); a wrong answer raises ``AssertionError``
with a hint; a right one prints why it is right. No message reveals the answer.

=========  ==============================================================================
chapter    checks
=========  ==============================================================================
0          :func:`check_largest_batch` (the explorer's memory panel)
1          :func:`check_steps_per_epoch` (also in chapter 2), :func:`check_scaled_lr` (also in 7)
2          :func:`check_squares_dataset`, :func:`check_normalize_stats`
3          :func:`check_padding_collate`, :func:`check_best_num_workers`,
           :func:`check_persistent_prediction`
5          :func:`check_hook_fix`
6          :func:`check_loop_bugs`, :func:`check_accumulation_loop`
8          :func:`check_bytes_per_parameter`, :func:`check_checkpoint_segments`, :func:`check_critical_batch`
=========  ==============================================================================
"""

from .chapter0 import check_largest_batch
from .chapter1 import check_scaled_lr, check_steps_per_epoch
from .chapter2 import check_normalize_stats, check_squares_dataset
from .chapter3 import check_best_num_workers, check_padding_collate, check_persistent_prediction
from .chapter5 import check_hook_fix
from .chapter6 import check_accumulation_loop, check_loop_bugs
from .chapter8 import check_bytes_per_parameter, check_checkpoint_segments, check_critical_batch
from .turn import your_turn

__all__ = [
    "check_accumulation_loop",
    "check_best_num_workers",
    "check_bytes_per_parameter",
    "check_checkpoint_segments",
    "check_critical_batch",
    "check_hook_fix",
    "check_largest_batch",
    "check_loop_bugs",
    "check_normalize_stats",
    "check_padding_collate",
    "check_persistent_prediction",
    "check_scaled_lr",
    "check_squares_dataset",
    "check_steps_per_epoch",
    "your_turn",
]
