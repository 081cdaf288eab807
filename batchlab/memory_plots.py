"""Figures of memory: one step's timeline by category, peaks against batch size (chapter 4), leak checks
(chapter 5), the explorer's memory bars. Each returns a ``matplotlib.figure.Figure``, like :mod:`batchlab.plots`.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .leaks import LeakReport
from .memory import CATEGORIES, MemoryReport
from .validation import GiB, MiB

# One colour per category, the same in every figure of the course.
COLORS = {
    "parameters": "#4C72B0",
    "buffers": "#8172B3",
    "gradients": "#DD8452",
    "optimizer_state": "#C44E52",
    "activations": "#55A868",
    "inputs": "#937860",
    "temporaries": "#CCB974",
}


def _categories(reports) -> list:
    """Categories that hold bytes somewhere in ``reports``, in the usual order."""
    used = {c for r in reports for point in (r.timeline or []) for c, b in point.bytes.items() if b}
    used |= {c for r in reports for c, b in r.breakdown.items() if b}
    return [c for c in CATEGORIES if c in used] + sorted(used - set(CATEGORIES))


def plot_step_timeline(report: MemoryReport, *, title: str | None = None) -> Figure:
    """Bytes alive during one step, stacked by category, over its events, with the phases shaded.

    The x axis counts events (each allocation or free), not time: every change of memory gets one
    step of the axis. The dashed line and the label mark the peak.
    """
    if not isinstance(report, MemoryReport) or not report.timeline:
        raise TypeError("report must be a MemoryReport with a timeline, as profile_step or tracker.report() returns")
    categories = _categories([report])
    xs = list(range(len(report.timeline)))
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.stackplot(
        xs,
        [[p.bytes.get(c, 0) / MiB for p in report.timeline] for c in categories],
        labels=[c.replace("_", " ") for c in categories],
        colors=[COLORS.get(c) for c in categories],
        step="post",
        alpha=0.9,
    )
    # Shade and name each run of events in one phase.
    start, shade, last_label = 0, 0, (-len(xs), 1.0)
    for i in range(1, len(xs) + 1):
        if i == len(xs) or report.timeline[i].phase != report.timeline[start].phase:
            if report.timeline[start].phase != "start":
                shade += 1
                ax.axvspan(start - 0.5, i - 0.5, color="grey", alpha=0.16 if shade % 2 else 0.06, lw=0)
                # Names of short phases next to each other go on two rows so that they do not overlap.
                center = (start + i - 1) / 2
                y = 1.07 if center - last_label[0] < 0.12 * len(xs) and last_label[1] == 1.0 else 1.0
                ax.text(
                    center,
                    y,
                    report.timeline[start].phase,
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize="small",
                )
                last_label = (center, y)
            start = i
    peak_x = max(xs, key=lambda i: report.timeline[i].total)
    ax.axhline(report.peak_bytes / MiB, color="black", linestyle="--", linewidth=0.8)
    ax.annotate(
        f"peak {report.peak_bytes / MiB:.1f} MiB",
        (peak_x, report.peak_bytes / MiB),
        xytext=(4, 4),
        textcoords="offset points",
        fontsize="small",
    )
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(0, report.peak_bytes / MiB * 1.15 or 1)
    ax.set_xlabel("events of the step (allocations and frees, in order)")
    ax.set_ylabel("MiB alive")
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], names[::-1], loc="outside right upper", fontsize="small")  # top of the stack first
    fig.suptitle(title or report.label or f"one training step on {report.device}")
    return fig


def plot_peak_breakdown(reports, *, xlabel: str = "batch size", title: str | None = None) -> Figure:
    """Peak bytes of several steps, as bars stacked by category (what is alive at each peak).

    ``reports`` is a dict ``{batch size (or any label): MemoryReport}``.
    """
    if not isinstance(reports, dict) or not reports or not all(isinstance(r, MemoryReport) for r in reports.values()):
        raise TypeError(
            "reports must be a non-empty dict {batch size: MemoryReport}, "
            "e.g. {b: batchlab.profile_step(model, batch_of(b)) for b in (16, 64, 256)}"
        )
    labels = [str(k) for k in reports]
    categories = _categories(list(reports.values()))
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    bottom = [0.0] * len(labels)
    for category in categories:
        heights = [r.breakdown.get(category, 0) / MiB for r in reports.values()]
        ax.bar(labels, heights, bottom=bottom, color=COLORS.get(category), label=category.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, r in enumerate(reports.values()):
        ax.text(i, bottom[i], f"{r.peak_bytes / MiB:.1f}", ha="center", va="bottom", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MiB alive at the peak")
    ax.set_ylim(0, max(bottom) * 1.12 or 1)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], names[::-1], loc="outside right upper", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_leak_checks(reports, *, title: str | None = None) -> Figure:
    """What each iteration of :func:`batchlab.leak_check` left behind: tensor memory and autograd graph
    nodes (counted from the start of the check), one line per report (its ``label``), so that a leak
    and its fix can be compared. Solid lines are leaks, dashed lines are not."""
    reports = [reports] if isinstance(reports, LeakReport) else list(reports)
    if not reports or not all(isinstance(r, LeakReport) for r in reports):
        raise TypeError("reports must be a LeakReport or a non-empty list of them, as batchlab.leak_check returns")
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    memory_ax, nodes_ax = fig.subplots(1, 2)
    for i, r in enumerate(reports):
        label = r.label or f"check {i + 1}"
        style = "-" if r.leaking else "--"
        xs = range(1, len(r.bytes) + 1)
        memory_ax.plot(xs, [b / 1024 for b in r.bytes], style, marker=".", label=label)
        nodes_ax.plot(xs, r.nodes, style, marker=".", label=label)
    memory_ax.set_ylabel("tensor KiB left behind")
    nodes_ax.set_ylabel("autograd graph nodes left behind")
    series = ([b / 1024 for r in reports for b in r.bytes], [n for r in reports for n in r.nodes])
    for ax, values in zip((memory_ax, nodes_ax), series):
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        low, high = min(0, min(values)), max(1, max(values))  # flat lines at zero stay at the bottom
        ax.set_ylim(low - 0.03 * (high - low), high + 0.08 * (high - low))
    memory_ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_memory(points: dict, *, title: str = "") -> Figure:
    """Horizontal bars stacked by category, one per ``{label: batchlab.explorer.MemoryPoint}``, against the
    device's size (all points on the same profile).

    On a GPU the CUDA context comes first (it is there before any tensor), then the tensors at the
    step's peak, then the allocator's cache: where the tensors end, against the dashed line, is the
    comparison of the tensors with what PyTorch may use (the device's size minus the context).
    """
    fig = Figure(figsize=(8.4, 0.9 + 0.55 * len(points)), layout="constrained")
    ax = fig.subplots()
    labels = list(points)[::-1]  # the first point on top
    profile = next(iter(points.values())).profile
    left = [0.0] * len(labels)
    for category in _bar_categories(points.values()):
        widths = [_category_bytes(points[label], category) / GiB for label in labels]
        color = COLORS.get(category, EXTRA_COLORS.get(category, "#B0B0B0"))
        ax.barh(labels, widths, left=left, color=color, label=category.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(profile.capacity / GiB, color="black", linestyle="--", linewidth=1)
    ax.text(
        profile.capacity / GiB,
        1.0,
        f" {_short(profile)}",
        transform=ax.get_xaxis_transform(),
        va="bottom",
        fontsize="small",
    )
    ax.set_xlim(0, max(left + [profile.capacity / GiB]) * 1.08)
    ax.set_xlabel("GiB at the step's peak" + (": CUDA context, tensors, allocator cache" if profile.reserved else ""))
    fig.legend(loc="outside right upper", fontsize="x-small")
    if title:
        warns = "out of memory" in title or "too close" in title
        fig.suptitle(title, fontsize="medium", color="#C44E52" if warns else "black")
    return fig


EXTRA_COLORS = {
    "workspaces": "#B07AA1",
    "allocator rounding": "#BAB0AC",
    "allocator cache": "#E5E5E5",
    "CUDA context": "#7F7F7F",
}


def _bar_categories(points) -> list:
    used = {c for p in points for c, b in p.breakdown.items() if b}
    order = [c for c in CATEGORIES if c in used] + sorted(used - set(CATEGORIES))
    order += ["allocator cache"] if any(p.cached_bytes for p in points) else []
    return (["CUDA context"] if any(p.profile.reserved for p in points) else []) + order


def _category_bytes(point, category: str) -> int:
    if category == "CUDA context":
        return point.profile.reserved
    return point.cached_bytes if category == "allocator cache" else point.breakdown.get(category, 0)


def _short(profile) -> str:
    return f"{profile.capacity / GiB:.0f} GiB GPU" if profile.device == "cuda" else "free RAM"
