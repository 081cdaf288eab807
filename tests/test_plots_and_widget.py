import io

import pytest
from matplotlib.figure import Figure
from matplotlib.mathtext import MathTextParser

import batchlab
from batchlab import datasets
from batchlab.plots import figure_to_png, smoothed
from batchlab.widgets import AccumulationExplorer, ConvergenceExplorer


@pytest.fixture(scope="module")
def small_digits():
    return datasets.digits(train=False)


def test_plot_histories_draws_one_panel_per_axis(small_digits):
    runs = [
        batchlab.train(
            batchlab.build_model("mlp", in_shape=(1, 8, 8)), small_digits, batch_size=b, epochs=1, progress=False
        )
        for b in (16, 64)
    ]
    fig = batchlab.plot_histories(runs, x=("steps", "samples"))
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [len(r.loss) for r in runs]
    assert figure_to_png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="x must name axes among steps, samples, seconds"):
        batchlab.plot_histories(runs, x="epochs")
    with pytest.raises(TypeError, match="History"):
        batchlab.plot_histories([])


def test_smoothing_is_a_trailing_mean():
    history = batchlab.History("h", 1, loss=[1.0, 3.0, 5.0, 7.0])
    assert smoothed(history, 0.5) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed(history, 0) == history.loss


def test_convergence_widget_follows_its_controls(small_digits):
    widget = ConvergenceExplorer(small_digits, epochs=1, batch_size=64, lr=0.05, keep=2)
    first_png = bytes(widget.image.value)
    assert first_png.startswith(b"\x89PNG") and "batch 64" in widget.summary.value
    state = widget.set(batch_size=16)
    assert [run["label"] for run in state["runs"]] == ["batch 64, lr 0.05", "batch 16, lr 0.05"]
    assert [run["steps"] for run in state["runs"]] == [359 // 64, 359 // 16]
    assert bytes(widget.image.value) != first_png
    widget.lr.value = 0.1  # as a learner moving the slider
    labels = [run["label"] for run in widget.state["runs"]]
    assert labels == ["batch 16, lr 0.05", "batch 16, lr 0.1"]  # keep=2: the oldest run left the figure
    cached = widget._cache[(16, 0.05)]
    widget.set(lr=0.05)
    assert widget._shown[-1] is cached  # a setting already run is reused, not retrained
    widget.MAX_RUNS = 2
    for lr in (0.2, 0.3, 0.05):
        widget.set(lr=lr)
    assert list(widget._cache) == [(16, 0.3), (16, 0.05)]  # the newest runs, the reused one counted as new


def test_convergence_widget_refuses_bad_values(small_digits):
    widget = ConvergenceExplorer(small_digits, epochs=1)
    with pytest.raises(ValueError, match="batch_size must be one of"):
        widget.set(batch_size=3)
    with pytest.raises(ValueError, match="set\\(\\) takes batch_size and lr"):
        widget.set(model="cnn")
    with pytest.raises(ValueError, match="name must be one of"):
        ConvergenceExplorer(small_digits, model="vgg")
    bundle = widget._repr_mimebundle_()
    assert bundle["text/plain"] == "ConvergenceExplorer(model='mlp', epochs=1)"


@pytest.fixture
def mathtext_parsed(monkeypatch):
    """The strings matplotlib typesets with mathtext from now on (a spy on ``MathTextParser.parse``)."""
    parsed = []
    parse = MathTextParser.parse

    def spy(self, s, *args, **kwargs):
        parsed.append(s)
        return parse(self, s, *args, **kwargs)

    monkeypatch.setattr(MathTextParser, "parse", spy)
    return parsed


def log_figure(low: float, high: float) -> Figure:
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot([1, 2, 3], [low, (low * high) ** 0.5, high])
    ax.set_yscale("log")
    return fig


def y_labels(fig) -> dict:
    """``{tick position: label}`` of the labelled ticks, major and minor, of the figure's y axis as drawn."""
    ax = fig.axes[0]
    ticks = ax.get_yticklabels() + ax.get_yticklabels(minor=True)
    return {round(t.get_position()[1], 9): t.get_text() for t in ticks if t.get_text()}


@pytest.mark.parametrize("low, high", [(0.002, 40.0), (2.29, 2.31), (1.5, 2.4)])
def test_widget_pngs_label_log_axes_as_plain_numbers_without_mathtext(mathtext_parsed, low, high):
    # Issue 16's soak: matplotlib's mathtext labels (10⁻³, 2.3×10⁰) keep FreeType glyphs for every new figure
    # rendered, about 8 KiB each time, so a widget redrawn per change grew without end.
    reference = log_figure(low, high)
    reference.savefig(io.BytesIO(), format="png")  # matplotlib's own labels
    expected = y_labels(reference)
    assert expected and all(label.startswith("$") for label in expected.values())
    mathtext_parsed.clear()
    fig = log_figure(low, high)
    assert figure_to_png(fig).startswith(b"\x89PNG")
    assert mathtext_parsed == []
    assert y_labels(fig) == {y: f"{y:g}" for y in expected}  # the same ticks labelled, as plain numbers


def test_explorers_draw_their_log_axes_without_mathtext(small_digits, mathtext_parsed):
    convergence = ConvergenceExplorer(small_digits, epochs=1, batch_size=64, lr=0.05, keep=2)
    for size in (16, 32, 64):
        convergence.batch_size.value = size  # as a learner moves the slider: a new figure each time
    assert convergence.state["runs"][-1]["label"] == "batch 64, lr 0.05"
    accumulation = AccumulationExplorer(small_digits, effective_batch=16, micro_batch=4, steps=4)
    for micro in (8, 4, 8):
        accumulation.micro_batch.value = micro  # the loss panel has a log axis too
    assert accumulation.state["micro_batch"] == 8
    assert mathtext_parsed == []
    convergence.close()
    accumulation.close()
