"""Is memory growing from one iteration to the next? A leak check for training loops (chapter 5).

:func:`leak_check` calls a function many times and watches three things after every call:

* **tensor memory** still alive (with :func:`batchlab.track_memory`, so tensors that only the autograd
  graph holds count too);
* **autograd graph nodes** reachable from the tensors Python holds: ``total += loss`` after
  ``backward()`` keeps a chain of nodes alive that holds no tensor storage at all;
* **Python objects** known to the garbage collector, by type.

Automatic garbage collection is paused during the check, so memory kept alive by reference cycles
shows up as growth (in a real loop it piles up until the collector happens to run); at the end one
``gc.collect()`` tells whether the growth was held by cycles.

The check of the chapter's exercise is :func:`batchlab.exercises.check_hook_fix`.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass, field

from .process import python_tensors
from .progress import progress_bar
from .tracker import active_trackers, track_storages
from .validation import MiB, check_bool, check_int


@dataclass
class LeakReport:
    """What grew while :func:`leak_check` called a function ``iterations`` times.

    ``bytes_per_iteration``, ``nodes_per_iteration`` and ``objects_per_iteration`` are the slopes of
    a least-squares line through ``bytes`` (tensor bytes alive after each call), ``nodes`` (autograd
    graph nodes reachable) and ``objects`` (objects the garbage collector tracks), all three counted
    from the start of the check. ``leaking`` is True when any of them grew steadily, in the first and in
    the second half of the run; ``message`` says which. ``growing`` names the node and object types
    that grew, with their growth per iteration; ``freed_by_gc`` is the tracked bytes that one
    ``gc.collect()`` released at the end (memory that reference cycles held).
    """

    leaking: bool
    bytes_per_iteration: float
    nodes_per_iteration: float
    objects_per_iteration: float
    message: str
    iterations: int
    bytes: list = field(default_factory=list, repr=False)
    nodes: list = field(default_factory=list, repr=False)
    objects: list = field(default_factory=list, repr=False)
    growing: dict = field(default_factory=dict, repr=False)
    freed_by_gc: int = 0
    label: str = ""

    def __repr__(self) -> str:
        title = f"{self.label}: " if self.label else ""
        verdict = "LEAKING" if self.leaking else "no leak"
        return f"LeakReport({title}{verdict}; {self.message})"


def _slope(values) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (growth per iteration)."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den


def _grows_steadily(values) -> bool:
    """True if ``values`` grew in both halves of the run (a one-off jump or a bounded cache does not)."""
    middle = len(values) // 2
    return values[middle] > values[0] and values[-1] > values[middle] and _slope(values) > 0


def graph_nodes(objects=None) -> Counter:
    """Autograd graph nodes reachable from the tensors Python holds, counted by type name.

    The nodes themselves live in C++ and are invisible to the garbage collector; a tensor's
    ``grad_fn`` and each node's ``next_functions`` lead to them. ``objects`` (default:
    ``gc.get_objects()``) is where to look for tensors.
    """
    seen: dict = {}  # id -> node; holding the nodes keeps their ids unique during the walk
    stack = [t.grad_fn for t in python_tensors(objects) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(next_node for next_node, _ in node.next_functions)
    return Counter(type(node).__name__ for node in seen.values())


# Objects that the leak check itself makes for each tensor storage it watches: not the caller's.
_OWN_TYPES = ("_StorageRef", "UntypedStorage")


def _object_types(exclude=()) -> Counter:
    """Objects the garbage collector tracks, by type name, without the leak check's own objects and
    without the Python wrappers of autograd nodes (types in ``exclude``: they are counted as nodes)."""
    counts = Counter()
    for kind, count in Counter(map(type, gc.get_objects())).items():
        counts[kind.__name__] += count
    for name in (*_OWN_TYPES, *exclude):
        counts.pop(name, None)
    return counts


def _growth(before: Counter, after: Counter, iterations: int) -> dict:
    """Types whose count grew by at least one per iteration, with their growth per iteration."""
    return {
        name: (after[name] - before[name]) / iterations for name in after if after[name] - before[name] >= iterations
    }


def _size(nbytes: float) -> str:
    return f"{nbytes / 1024:.1f} KiB" if abs(nbytes) < MiB else f"{nbytes / MiB:.1f} MiB"


def _describe(types: dict, limit: int = 6) -> str:
    """``name +growth`` for every type, largest first; past ``limit`` types the rest are summed, so the
    numbers listed always add up to the whole growth."""
    ordered = sorted(types.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{name} +{per:g}" for name, per in ordered[:limit])
    rest = ordered[limit:]
    if rest:
        text += f", +{sum(per for _, per in rest):g} in {len(rest)} other types"
    return text


def leak_check(fn, iterations: int = 20, *, warmup: int = 3, label: str = "", progress: bool = False) -> LeakReport:
    """Call ``fn()`` ``warmup`` times, then ``iterations`` times while measuring what stays alive.

    ``fn`` is one iteration of a loop (a training or evaluation step) taking no arguments. A function
    that leaks leaves more tensor memory, more autograd graph nodes or more Python objects behind
    after every call; a correct one leaves the same amount. The warm-up calls let one-off costs
    (optimizer state, caches) happen before measuring. Returns a :class:`LeakReport`.

    Garbage collection is paused while measuring and restored afterwards. Tensors that ``fn`` keeps
    stay alive (they are the caller's); clear them before calling again. ``progress=True`` draws a bar over
    the calls, for a slow ``fn``. It is off by default: a live bar in a notebook makes Python objects
    each time it redraws, and the check, which counts objects per iteration, would see them as growth.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function taking no arguments (one loop iteration), got {fn!r}")
    if isinstance(iterations, int) and not isinstance(iterations, bool) and iterations < 2:
        raise ValueError(
            f"iterations must be at least 2 to measure growth from one iteration to the next, "
            f"got {iterations}; 20 is a good default"
        )
    check_int("iterations", iterations, minimum=2)
    check_int("warmup", warmup, minimum=0)
    check_bool("progress", progress)
    if active_trackers():
        raise RuntimeError(
            "leak_check cannot run inside a track_memory or memory_budget block: the outer block's "
            "bookkeeping would be counted as objects that fn leaves behind. Run leak_check outside the block"
        )
    with progress_bar(progress, total=warmup + iterations, desc=f"leak_check {label}".strip(), unit="call") as bar:
        return _leak_check(fn, iterations, warmup, label, bar)


def _leak_check(fn, iterations, warmup, label, bar) -> LeakReport:
    """:func:`leak_check` after its arguments are checked; ``bar`` advances once per call of ``fn``."""
    for _ in range(warmup):
        fn()
        bar.update()
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with track_storages(None, None, record=False) as tracker:
            nodes_before = graph_nodes()  # first, so that the Python wrappers of existing nodes are counted
            objects_before = _object_types(exclude=nodes_before)
            node_start, object_start = sum(nodes_before.values()), sum(objects_before.values())
            byte_series, node_series, object_series = [], [], []
            for i in range(iterations):
                fn()
                bar.update()
                # Each series counts from the start of the check: what this check's calls left behind.
                byte_series.append(tracker.current_bytes)
                objects = gc.get_objects()
                node_series.append(sum(graph_nodes(objects).values()) - node_start)
                object_series.append(len(objects) - len(tracker._live) * len(_OWN_TYPES) - object_start)
                del objects
                if i == iterations // 2:
                    objects_middle = _object_types(exclude=nodes_before)
            nodes_after = graph_nodes()
            objects_after = _object_types(exclude=nodes_before | nodes_after)
            before_collect = tracker.current_bytes
            gc.collect()
            freed_by_gc = before_collect - tracker.current_bytes
    finally:
        if was_enabled:
            gc.enable()
    half = iterations - iterations // 2 - 1
    grown_types = _growth(objects_before, objects_after, iterations)
    # An object type counts as leaking only if it grew in both halves (not a one-off cache fill).
    grown_types = {
        name: per
        for name, per in grown_types.items()
        if objects_middle[name] > objects_before[name] and objects_after[name] - objects_middle[name] >= half
    }
    grown_nodes = _growth(nodes_before, nodes_after, iterations)
    report = LeakReport(
        leaking=False,
        bytes_per_iteration=_slope(byte_series),
        nodes_per_iteration=_slope(node_series),
        objects_per_iteration=_slope(object_series),
        message="",
        iterations=iterations,
        bytes=byte_series,
        nodes=node_series,
        objects=object_series,
        growing={**grown_nodes, **grown_types},
        freed_by_gc=freed_by_gc,
        label=label,
    )
    findings = []
    if _grows_steadily(byte_series):
        finding = f"tensor memory grows by {_size(report.bytes_per_iteration)} per iteration"
        if freed_by_gc >= 0.9 * (byte_series[-1] - byte_series[0]):
            finding += (
                " and gc.collect() frees it: reference cycles keep those tensors alive until "
                "the garbage collector happens to run"
            )
        findings.append(finding)
    if _grows_steadily(node_series) and grown_nodes:
        findings.append(
            f"autograd graph nodes grow by {report.nodes_per_iteration:g} per iteration "
            f"({_describe(grown_nodes)}): a tensor keeps its graph alive"
        )
    if grown_types:
        findings.append(f"Python objects grow ({_describe(grown_types)} per iteration)")
    report.leaking = bool(findings)
    report.message = (
        "; ".join(findings)
        if findings
        else (f"tensor memory, autograd graph nodes and Python objects stay flat over {iterations} iterations")
    )
    return report
