"""Figures the chapters draw, as ``matplotlib.figure.Figure`` objects (no pyplot global state).

A notebook shows a returned figure as its cell's output; a widget renders it to PNG with
:func:`figure_to_png`.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, LogFormatterMathtext, LogLocator

from .training import History

X_AXES = {"steps": "optimizer steps", "samples": "samples seen", "seconds": "wall-clock seconds"}


def plot_histories(
    histories,
    x=("steps", "samples", "seconds"),
    *,
    title: str | None = None,
    log_loss: bool = True,
    smooth: float = 0.05,
) -> Figure:
    """Training loss of several runs against each of ``x`` (steps, samples, seconds), one panel each.

    Comparing the panels is the point of chapter 1: a large batch looks best per step, a small batch
    per sample, and the fastest per second depends on the machine. Small batches give very noisy
    per-step losses, so each curve is a trailing mean over the last ``smooth`` fraction of its samples
    (0 draws the raw losses). Steps and seconds are on log axes: runs differ in both by orders of magnitude.
    """
    histories = [histories] if isinstance(histories, History) else list(histories)
    if not histories or not all(isinstance(h, History) for h in histories):
        raise TypeError("histories must be a History or a non-empty list of History objects from batchlab.train")
    x = (x,) if isinstance(x, str) else tuple(x)
    unknown = [axis for axis in x if axis not in X_AXES]
    if unknown or not x:
        raise ValueError(f"x must name axes among {', '.join(X_AXES)}, got {x!r}")
    fig = Figure(figsize=(4.2 * len(x), 3.4), layout="constrained")
    axes = fig.subplots(1, len(x), squeeze=False)[0]
    for ax, axis in zip(axes, x):
        for history in histories:
            xs = history.steps if axis == "steps" else getattr(history, axis)
            style = "o-" if len(xs) < 20 else "-"
            ax.plot(xs, smoothed(history, smooth), style, label=history.label, linewidth=1.2, markersize=4)
        if axis in ("steps", "seconds"):
            ax.set_xscale("log")
        ax.set_xlabel(X_AXES[axis])
        ax.set_ylabel("training loss" + (" (smoothed)" if smooth else ""))
        if log_loss:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def smoothed(history: History, fraction: float) -> list:
    """The loss as a trailing mean over the steps that cover the last ``fraction`` of the samples."""
    if not 0 <= fraction < 1:
        raise ValueError(f"smooth must be a fraction in [0, 1), got {fraction}")
    window = max(1, round(fraction * len(history.loss)))
    total, out = 0.0, []
    for i, loss in enumerate(history.loss):
        total += loss - (history.loss[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


class PlainLogFormatter(LogFormatter):
    """Tick labels of a log axis as plain numbers (0.001, 2.3, 100), on the ticks matplotlib's default labels.

    matplotlib's default (``LogFormatterSciNotation``) typesets 10⁻³ or 2.3×10⁰ with mathtext, and mathtext
    keeps the FreeType glyphs it loads for every new figure: about 8 KiB a drawing that is never given back
    (matplotlib issues 13019 and 17816). A widget that redraws on each change of a control (issue 16's soak)
    would grow by that much per change.
    """

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""  # the same ticks labelled, as plain text


def plain_log_labels(fig: Figure) -> None:
    """Give every log axis of ``fig`` that still has matplotlib's mathtext labels :class:`PlainLogFormatter` s."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            base = axis.get_transform().base
            major, minor = axis.get_major_formatter(), axis.get_minor_formatter()
            if isinstance(major, LogFormatterMathtext):
                axis.set_major_formatter(PlainLogFormatter(base, labelOnlyBase=major.labelOnlyBase))
            if isinstance(minor, LogFormatterMathtext):
                axis.set_minor_formatter(
                    PlainLogFormatter(base, labelOnlyBase=minor.labelOnlyBase, minor_thresholds=minor.minor_thresholds)
                )


def figure_to_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render ``fig`` to PNG bytes (for ``ipywidgets.Image``), without any date in the file.

    Log axes get plain-number tick labels first (:func:`plain_log_labels`): the widgets render a new figure
    on every change, and matplotlib's mathtext labels would leave memory behind each time.
    """
    plain_log_labels(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def plot_convergence(
    histories, *, dashed=(), title: str = "loss on the digits, trained on this machine's CPU"
) -> Figure:
    """The explorer's convergence panel: loss against steps and samples on a linear axis (the runs span a
    factor of a few, not decades), the histories labelled in ``dashed`` drawn dashed (accumulated runs), so
    that one lying on its full-batch twin stays visible."""
    fig = plot_histories(list(histories), x=("steps", "samples"), log_loss=False, title=title)
    fig.axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 10, 100, not 10⁰
    dash_lines(fig, set(dashed))
    return fig


def dash_lines(fig: Figure, labels: set) -> None:
    """Draw the lines labelled ``labels`` dashed, thicker and on top, in every axes of ``fig`` and its legend."""
    if not labels:
        return
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in labels:
                line.set_linestyle((0, (4, 3)))
                line.set_linewidth(2.0)
                line.set_zorder(3)  # above a solid curve it may lie on
    if fig.axes and fig.axes[0].get_legend() is not None:
        fig.axes[0].legend(fontsize="small")  # again, so that the legend shows the dashes


def plot_speed(points: dict, current=None, *, title: str = "") -> Figure:
    """Samples per second against batch size: ``{batch size: samples/s}``, ``current`` highlighted."""
    fig = Figure(figsize=(4.2, 3.0), layout="constrained")
    ax = fig.subplots()
    sizes = sorted(points)
    ax.plot(sizes, [points[b] for b in sizes], "o-", color="#4C72B0")
    if current in points:
        ax.plot([current], [points[current]], "o", markersize=11, markerfacecolor="none", color="#C44E52")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # 20,000 rather than 2×10⁴
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples per second (this CPU)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize="medium")
    return fig
