"""The batch-size explorer and the machinery every explorer shares (issue 7).

Widgets are driven as a learner drives them, through ``set`` and their controls' ``.value``, and
checked through ``state`` and what their panels show. The computations behind them are checked
as plain functions (batchlab.explorer).
"""

import gc
import io
import threading
import time

import psutil
import pytest
import torch

import batchlab
from batchlab import datasets
from batchlab import explorer as ex
from batchlab import explorer_runs as er
from batchlab import explorer_text as say
from batchlab.widgets import BatchSizeExplorer, Jobs


@pytest.fixture(scope="module")
def small_digits():
    return datasets.digits(train=False)  # 359 images: short runs


@pytest.fixture
def explorer(small_digits):
    widget = BatchSizeExplorer(small_digits, model="mlp", batch_size=32, profile="GPU 4 GiB (simulated)")
    widget.wait()
    yield widget
    widget.close()


def explorer_threads():
    return [t for t in threading.enumerate() if t.name == "batchlab-explorer"]


# -- the computations (batchlab.explorer) --------------------------------------------------------


def test_batch_sizes_are_a_log_scale_and_typed_values_are_clamped_or_refused():
    assert ex.batch_size_options(1438) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1438)
    assert ex.batch_size_options(4096)[-2:] == (2048, 4096)
    assert ex.read_batch_size(" 256 ", 1438) == (256, "")
    assert ex.read_batch_size("1,024", 1438) == (1024, "")
    size, note = ex.read_batch_size("99999", 1438)
    assert size == 1438 and "using 1438" in note
    size, note = ex.read_batch_size(0, 1438)
    assert size == 1 and "using 1" in note
    size, note = ex.read_batch_size("12.6", 1438)
    assert size == 13 and "not a whole number" in note
    for text in ("abc", "", "nan", "inf"):
        size, note = ex.read_batch_size(text, 1438)
        assert size is None and repr(text) in note


def test_accumulation_steps_are_fitted_to_the_batch():
    assert ex.fit_accumulation(64, 4) == (4, "")
    steps, note = ex.fit_accumulation(1438, 4)  # 1438 = 2 x 719
    assert steps == 2 and "micro-batches of 719" in note
    assert ex.fit_accumulation(3, 8)[0] == 3  # at most one sample per micro-batch
    assert ex.fit_accumulation(7, 0)[0] == 1


def test_memory_point_agrees_with_the_estimator_and_the_largest_batch():
    profile = ex.device_profiles()["GPU 4 GiB (simulated)"]
    assert profile.budget == 4 * 2**30 - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    shape = ex.memory_input_shape("cnn")
    model = ex.meta_model("cnn", shape)
    assert shape == (3, 224, 224) and next(model.parameters()).device.type == "meta"
    point = ex.memory_point(model, shape, 32, profile)
    report = batchlab.estimate_memory(model, ex.meta_batch(32, shape), device="cuda")
    assert point.peak_bytes == report.peak_bytes and point.breakdown == report.breakdown and point.fits
    largest = ex.largest_batch(model, shape, profile)
    assert largest == batchlab.max_batch_size(model, lambda n: ex.meta_batch(n, shape), budget=profile.budget)
    assert ex.memory_point(model, shape, largest, profile).fits
    too_big = ex.memory_point(model, shape, 2 * largest, profile)
    assert not too_big.fits
    with pytest.raises(torch.OutOfMemoryError):  # the simulated GPU agrees
        batchlab.estimate_memory(model, ex.meta_batch(2 * largest, shape), budget=profile.budget)


def test_an_accumulated_step_is_estimated_as_batchlab_train_runs_it():
    profile = ex.device_profiles()["GPU 80 GiB (simulated)"]
    shape = ex.memory_input_shape("cnn")
    model = ex.meta_model("cnn", shape)
    whole = ex.memory_point(model, shape, 64, profile)
    split = ex.memory_point(model, shape, 64, profile, accumulation_steps=4)
    report = batchlab.estimate_memory(model, ex.meta_batch(64, shape), accumulation_steps=4)
    assert split.peak_bytes == report.peak_bytes and split.breakdown == report.breakdown
    assert split.breakdown["activations"] < whole.breakdown["activations"] / 3  # a quarter of the samples at once
    assert split.peak_bytes < whole.peak_bytes


def test_training_losses_are_the_losses_of_batchlab_train(small_digits):
    for accumulation in (1, 2):
        model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
        history = batchlab.train(
            model, small_digits, batch_size=32, steps=14, lr=0.05, accumulation_steps=accumulation, progress=False
        )
        model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
        losses = list(
            er.training_losses(model, small_digits, batch_size=32, lr=0.05, steps=14, accumulation_steps=accumulation)
        )
        assert losses == history.loss  # same loop: the same numbers, bit for bit


def test_training_runs_touch_no_global_random_state(small_digits):
    data = er.training_data("transformer", small_digits)
    tokens, label = data[0]
    assert tokens.shape == (8,) and tokens.dtype == torch.long and 0 <= int(tokens.min()) <= int(tokens.max()) < 256
    model = er.training_model("transformer", data)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    before = torch.get_rng_state()
    first = list(er.training_losses(model, data, batch_size=32, lr=0.01, steps=3))
    assert torch.equal(torch.get_rng_state(), before)
    again = list(er.training_losses(er.training_model("transformer", data), data, batch_size=32, lr=0.01, steps=3))
    assert first == again


def test_run_length_is_short_for_every_model():
    assert er.run_length("mlp", 64, 1438) == 2 * (1438 // 64)
    assert er.run_length("mlp", 1, 1438) == er.RUNS["mlp"][1]
    assert er.run_length("resnet18", 16, 1438) == min(1438 // 16, er.RUNS["resnet18"][1])
    assert er.run_length("cnn", 1438, 1438) == 2


# -- what the panels say and draw (pure functions) ----------------------------------------------

GPU4 = ex.Profile("GPU 4 GiB (simulated)", "cuda", 4 * 2**30, 300 * 2**20)


def a_point(peak_gib, *, fits, cached_gib=0.0, batch=64, profile=GPU4, verdict=None):
    peak = int(peak_gib * 2**30)
    verdict = verdict or ("fits" if fits else "tensors")
    return ex.MemoryPoint(
        batch,
        peak,
        {"parameters": peak // 4, "activations": peak - peak // 4},
        profile,
        fits,
        int(cached_gib * 2**30),
        verdict,
        batch * 3 * 2**20,  # one more block of its largest tensor, 3 MiB a sample
    )


def a_run(label_batch, losses, *, steps=1, model="mlp", done=True, seconds=None):
    run = er.Run(er.RunSetting(model, label_batch, 0.05, steps), len(losses))
    run.history.loss[:] = losses
    run.history.samples[:] = [label_batch * (i + 1) for i in range(len(losses))]
    run.history.seconds[:] = seconds or [0.01 * (i + 1) for i in range(len(losses))]
    run.done = done
    return run


def test_memory_text_says_the_verdict_and_the_numbers_behind_it():
    s = er.RunSetting("cnn", 64, 0.05)
    fits = say.memory_text(s, a_point(2.0, fits=True, cached_gib=0.5), 98, (3, 224, 224))
    assert fits.startswith(
        "<b>Fits.</b> One training step of cnn on 3x224x224 images at batch 64 needs 2.00 GiB of "
        "tensors at its peak; with the allocator's cache (512 MiB) that is within the 3.71 GiB"
    )
    assert "whose other 300 MiB are the CUDA context" in fits
    assert "context, the tensors and the cache: 2.79 GiB." in fits
    assert fits.endswith(
        "The largest batch that fits in one step: <b>98</b> (estimated, with max_batch_size's margin)."
    )
    over = say.memory_text(er.RunSetting("cnn", 256, 0.05), a_point(5.0, fits=False, batch=256), 98, (3, 224, 224))
    assert (
        "Out of memory.</b>" in over
        and "needs 5.00 GiB of tensors at its peak: 1.29 GiB more than the 3.71 GiB" in over
    )
    assert "accumulate 3 micro-batches of 85" not in over and "accumulate 4 micro-batches of 64" in over
    assert say.memory_text(s, a_point(2.0, fits=True), None, (3, 224, 224)).endswith(
        "Searching for the largest batch that fits…"
    )
    assert say.memory_text(s, a_point(5.0, fits=False), 0, (3, 224, 224)).endswith(
        "Not even the smallest batch fits this device."
    )
    cpu = ex.Profile(ex.CPU_PROFILE, "cpu", 8 * 2**30)
    text = say.memory_text(er.RunSetting("transformer", 8, 0.05), a_point(0.25, fits=True, profile=cpu), 512, (512,))
    assert "transformer on sequences of 512 tokens at batch 8 needs 256 MiB" in text and "free RAM" in text
    assert "cache" not in text and "context" not in text


def test_the_verdict_follows_chapter_4s_rule_and_says_which_number_decided_it():
    profile = ex.device_profiles()["GPU 4 GiB (simulated)"]
    shape = ex.memory_input_shape("cnn")
    model = ex.meta_model("cnn", shape)
    largest = ex.largest_batch(model, shape, profile)
    points = {n: ex.memory_point(model, shape, n, profile) for n in (largest, largest + 4, 256)}
    assert points[largest].verdict == "fits" and points[largest].fits
    report = batchlab.estimate_memory(model, ex.batch_from(shape, largest), budget=profile.budget, keep_margin=True)
    assert points[largest].margin_bytes == report.margin_bytes > 0
    close = points[largest + 4]  # the step itself may run, but not with its margin free: aim lower
    assert close.verdict in ("margin", "allocator") and not close.fits
    assert points[256].verdict == "tensors" and points[256].peak_bytes > profile.budget
    for point in points.values():  # the allocator releases its cache before it gives up: never above the budget
        assert point.peak_bytes + point.cached_bytes <= max(profile.budget, point.peak_bytes)
    s = er.RunSetting("cnn", largest, 0.05)
    text = say.memory_text(s, points[largest], largest, shape)
    assert (
        f"with room for one more block of its largest tensor ({say.size_text(report.margin_bytes)}) to spare: "
        f"the margin chapter 4 asks for decided it." in text
    )
    margin = a_point(3.0, fits=False, batch=100, verdict="margin")
    text = say.memory_text(er.RunSetting("cnn", 100, 0.05), margin, 98, shape)
    assert text.startswith("<b style='color:#C44E52'>Too close to the limit.</b>")
    assert (
        "but without room for one more block of its largest tensor (300 MiB): aim below the limit (chapter 4). "
        "The margin decided it." in text
    )
    allocator = a_point(3.0, fits=False, batch=128, verdict="allocator")
    text = say.memory_text(er.RunSetting("cnn", 128, 0.05), allocator, 98, shape)
    assert (
        "but even after releasing its cache the caching allocator cannot place the step's blocks there "
        "(fragmentation). The simulated allocator decided it, not the tensors." in text
    )
    assert "would reserve" not in text


def test_the_slider_gets_finer_stops_around_the_largest_batch_that_fits(small_digits):
    assert ex.batch_size_options(1438, 98) == (
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        88,
        93,
        96,
        98,
        100,
        102,
        104,
        108,
        128,
        256,
        512,
        1024,
        1438,
    )
    assert ex.batch_size_options(100, 98)[-4:] == (93, 96, 98, 100)  # never beyond the limit
    widget = BatchSizeExplorer(small_digits, model="cnn", batch_size=64, profile="4 GiB", panels="memory")
    largest = widget.state["largest_batch"]
    options = widget.batch_size.options
    assert {round(largest * f) for f in ex.NEAR_STOPS} <= set(options)  # added once the search ended
    index = options.index(largest)
    widget.batch_size.value = options[index]
    assert widget.state["fits"] and widget.state["verdict"] == "fits"
    widget.batch_size.value = options[index + 2]  # two stops further (4% more): across the limit
    state = widget.state
    assert (
        not state["fits"] and state["verdict"] in ("margin", "allocator") and state["batch_size"] == options[index + 2]
    )
    widget.close()


def test_run_texts_say_the_progress_the_result_and_whether_twins_coincide():
    whole, split = a_run(64, [2.0, 1.5, 1.0]), a_run(64, [2.0, 1.5, 1.0 + 1e-6], steps=4)
    assert say.run_text(a_run(64, [2.0], done=False), []) == "Training <b>mlp, batch 64, lr 0.05</b>: step 1 of 1…"
    text = say.run_text(split, [whole, split])
    assert text.startswith(
        "<b>mlp, batch 64 (4x16), lr 0.05</b>: 3 steps, 192 samples, final loss 1.000 (a short "
        "run: 2 epochs, at most 300 steps)."
    )
    assert (
        "Its curve (dashed) and the one of <b>mlp, batch 64, lr 0.05</b> lie on each other: the losses differ by "
        "at most 1.0e-06" in text
    )
    apart = a_run(64, [2.0, 1.4, 0.9], steps=4)
    assert say.twin_text(apart, [whole, apart], batch_norm=True) == (
        " Its curve (dashed) and the one of <b>mlp, batch 64, lr 0.05</b> differ by up to 0.100 in loss: BatchNorm "
        "normalises each micro-batch with its own statistics (chapter 6)."
    )
    assert "rounded differently" in say.twin_text(whole, [apart, whole])
    assert say.twin_text(whole, [a_run(32, [1.0, 1.0, 1.0], steps=2), whole]) == ""  # not the same batch
    assert er.has_batch_norm(batchlab.build_model("cnn_bn", in_shape=(1, 8, 8)))
    assert not er.has_batch_norm(batchlab.build_model("mlp", in_shape=(1, 8, 8)))


def test_speed_text_and_points_come_from_the_finished_runs():
    run = a_run(64, [1.0, 0.9], seconds=[0.01, 0.02])
    assert say.speed_text(run) == (
        "<b>6,400 samples/s</b> at batch 64 (10.0 ms per step), measured on this machine's CPU."
    )
    others = [run, a_run(32, [1.0], done=False), a_run(16, [1.0], steps=2), a_run(8, [1.0], model="cnn")]
    assert er.speed_points(others, run.setting) == {64: 6400.0}
    assert say.notes_html(["a < b"]) == "<div style='color:#C44E52'>⚠ a &lt; b</div>"


def test_plot_memory_draws_context_tensors_and_cache_against_the_device():
    from batchlab.memory_plots import plot_memory

    fig = plot_memory({"batch 64": a_point(2.0, fits=True, cached_gib=0.5)}, title="cnn: fits")
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([300 / 1024, 0.5, 1.5, 0.5])  # context, parameters, activations, cache
    assert sum(widths) == pytest.approx((2.0 * 2**30 + 300 * 2**20 + 0.5 * 2**30) / 2**30)
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [4.0]  # the device's size, dashed
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "CUDA context",
        "parameters",
        "activations",
        "allocator cache",
    ]
    assert fig._suptitle.get_text() == "cnn: fits"


def test_plot_speed_and_plot_convergence_draw_what_they_are_given():
    from batchlab.plots import plot_convergence, plot_speed

    fig = plot_speed({64: 5000.0, 8: 1000.0, 16: 2000.0}, current=16, title="mlp")
    line, ring = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [8, 16, 64] and list(line.get_ydata()) == [1000.0, 2000.0, 5000.0]
    assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([16], [2000.0])
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_title() == "mlp"
    whole, split = a_run(64, [2.0, 1.5, 1.0]), a_run(64, [2.0, 1.5, 1.0], steps=4)
    fig = plot_convergence([whole.history, split.history], dashed={split.history.label})
    for ax in fig.axes:
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == {"mlp, batch 64, lr 0.05": "-", "mlp, batch 64 (4x16), lr 0.05": "--"}
        assert ax.get_yscale() == "linear"


def test_the_explorer_model_imports_no_plotting_or_widgets():
    import subprocess
    import sys

    code = (
        "import sys, batchlab.explorer, batchlab.explorer_runs; "
        "print(sorted(m for m in ('matplotlib', 'ipywidgets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_explorer_inputs_are_read_by_plain_functions():
    profiles = ex.device_profiles()
    assert say.profile_name(16, profiles) == say.profile_name("16GB", profiles) == "GPU 16 GiB (simulated)"
    assert say.profile_name("cpu", profiles) == ex.CPU_PROFILE and say.profile_name("5 GiB", profiles) is None
    assert (
        say.read_profile("tpu", profiles)[0] is None
        and "'tpu' is not one of the profiles" in say.read_profile("tpu", profiles)[1][0]
    )
    assert say.read_lr("2", 0.05) == (1.0, ["learning rate 2 is outside 0.001 to 1; using 1."])
    assert say.read_lr("nan", 0.05) == (0.05, ["learning rate: 'nan' is not a finite number; kept 0.05."])
    assert say.read_model("vgg")[0] is None and say.read_model("cnn") == ("cnn", [])
    assert say.read_steps("x", 2) == (None, ["accumulation steps: 'x' is not a whole number; kept 2."])
    assert say.check_panels("memory") == ("memory",)


# -- the shared machinery ------------------------------------------------------------------------


def test_jobs_run_the_newest_work_only_and_never_two_at_once():
    jobs, log, started = Jobs(background=True), [], threading.Event()
    running = []

    def slow(name):
        def work(job):
            running.append(name)
            assert len(running) == 1  # never two computations at once
            started.set()
            while not job.cancelled and len(log) < 1000:
                time.sleep(0.005)
            running.remove(name)
            job.publish(lambda: log.append(name))

        return work

    jobs.submit(slow("old"))
    started.wait(5)
    jobs.submit(lambda job: job.publish(lambda: log.append("new")))
    assert jobs.wait(10) and not jobs.running
    assert log == ["new"]  # the cancelled job could not draw


def test_jobs_run_in_one_thread_that_close_or_garbage_collection_ends():
    jobs, threads = Jobs(background=True), set()
    for _ in range(20):
        jobs.submit(lambda job: threads.add(threading.current_thread()))
        assert jobs.wait(10)
    assert len(threads) == 1 and threads != {threading.current_thread()} and threads.pop().is_alive()
    thread = jobs._worker.thread
    assert jobs.close(10) and not thread.is_alive()
    assert jobs.close(10)  # closing twice does nothing
    jobs.submit(lambda job: None)  # a closed queue may be used again: it starts a new thread
    thread = jobs._worker.thread
    assert jobs.wait(10) and thread.is_alive()
    del jobs
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()  # a queue dropped without close() ends its thread too


def test_a_background_job_that_raises_without_a_handler_does_not_stop_the_next(monkeypatch):
    printed, done = [], []
    monkeypatch.setattr("sys.excepthook", lambda kind, error, tb: printed.append(kind))
    jobs = Jobs(background=True)
    jobs.submit(lambda job: 1 / 0)
    assert jobs.wait(10)
    jobs.submit(lambda job: done.append(True))
    assert jobs.wait(10) and done == [True] and printed == [ZeroDivisionError]
    jobs.close(10)


def test_a_job_may_wait_for_its_own_queue_without_deadlock():
    jobs, seen = Jobs(background=True), []
    jobs.submit(lambda job: seen.append(jobs.wait(10)))
    assert jobs.wait(10) and seen == [True]
    jobs.close(10)


def test_jobs_show_errors_instead_of_raising():
    shown = []
    jobs = Jobs(background=True, on_error=shown.append)
    jobs.submit(lambda job: 1 / 0)
    jobs.wait(10)
    assert len(shown) == 1 and isinstance(shown[0], ZeroDivisionError)
    inline = Jobs(background=False)
    with pytest.raises(ZeroDivisionError):  # inline jobs without a handler raise, like a function
        inline.submit(lambda job: 1 / 0)


# -- the explorer --------------------------------------------------------------------------------


def test_explorer_shows_memory_convergence_and_speed(explorer):
    state = explorer.state
    assert (state["model"], state["batch_size"], state["profile"]) == ("mlp", 32, "GPU 4 GiB (simulated)")
    assert state["fits"] and state["peak_bytes"] == sum(state["breakdown"].values())
    assert {"parameters", "gradients", "optimizer_state", "activations"} <= set(state["breakdown"])
    assert state["run"] == "mlp, batch 32, lr 0.05" and not state["running"]
    assert state["steps"] == state["steps_planned"] == 2 * (359 // 32) == len(state["loss"])
    assert state["samples"] == [32 * (i + 1) for i in range(state["steps"])]
    assert state["samples_per_second"] > 0 and state["message"] == ""
    for panel in (explorer.memory, explorer.convergence, explorer.speed):
        assert bytes(panel.image.value).startswith(b"\x89PNG")
    assert "Fits." in explorer.memory.text.value and "samples/s" in explorer.speed.text.value
    assert explorer._repr_mimebundle_()["text/plain"] == "BatchSizeExplorer(panels=('memory', 'convergence', 'speed'))"


def test_explorer_output_carries_a_still_png_of_its_panels_after_the_live_widget(explorer):
    from PIL import Image

    bundle = explorer._repr_mimebundle_()
    # JupyterLab renders the widget view; GitHub and nbviewer, which cannot, show the PNG; nbval compares text.
    assert list(bundle) == ["application/vnd.jupyter.widget-view+json", "image/png", "text/plain"]
    still = Image.open(io.BytesIO(bundle["image/png"]))
    panels = [
        Image.open(io.BytesIO(bytes(p.image.value))) for p in (explorer.memory, explorer.convergence, explorer.speed)
    ]
    assert still.format == "PNG"
    assert still.size == (max(p.width for p in panels), sum(p.height for p in panels))  # the three, stacked
    top = panels[0].convert("RGB")
    assert still.convert("RGB").crop((0, 0, top.width, top.height)).tobytes() == top.tobytes()


def test_a_box_without_pictures_has_no_still_png():
    import ipywidgets as widgets

    from batchlab.widgets.base import Panel, still_png

    assert still_png(widgets.VBox([Panel("nothing drawn yet").box, widgets.IntSlider()])) is None


def test_a_batch_that_does_not_fit_shows_out_of_memory_and_the_largest_that_does(small_digits):
    widget = BatchSizeExplorer(small_digits, model="cnn", batch_size=32, profile="4 GiB", panels="memory")
    first = (widget.memory.text.value, bytes(widget.memory.image.value))
    widget.batch_size.value = 256  # the slider, as a learner moves it
    assert not widget.state["fits"]  # known at once, from one estimate
    widget.wait()  # the search for the largest batch that fits runs in the background
    state = widget.state
    assert not state["fits"] and 0 < state["largest_batch"] < 256
    text = widget.memory.text.value
    assert "Out of memory." in text and f"<b>{state['largest_batch']}</b>" in text
    assert (widget.memory.text.value, bytes(widget.memory.image.value)) != first
    assert "accumulate 4 micro-batches of 64" in widget.memory.text.value
    # The text names what is compared with the budget (the tensors) and what else the bar holds.
    point = widget.memory_view.shown[0]
    over = (point.peak_bytes - state["budget_bytes"]) / 2**30
    assert (
        f"One training step of cnn on 3x224x224 images at batch 256 needs {point.peak_bytes / 2**30:.2f} GiB "
        f"of tensors at its peak: {over:.2f} GiB more than the {state['budget_bytes'] / 2**30:.2f} GiB PyTorch "
        f"can use" in text
    )
    assert point.verdict == "tensors" and point.cached_bytes == 0  # the allocator released its cache before failing
    assert (
        f"The tensors alone decided it. The bar shows the context and the tensors: "
        f"{point.device_bytes / 2**30:.2f} GiB." in text
    )
    state = widget.set(accumulation_steps=4)  # the way out that the panel suggests
    assert state["fits"] and state["micro_batch"] == 64
    state = widget.set(profile=80, accumulation_steps=1)
    assert state["fits"] and state["largest_batch"] > 256
    assert state["loss"] == [] and state["run"] is None and not widget.jobs.running  # no convergence panel
    widget.close()
    assert not explorer_threads()  # closing ends the explorer's background thread


def test_state_reads_the_notes_not_the_html_it_shows(explorer):
    state = explorer.set(batch_size="lots", lr=5)
    assert explorer.notes == [
        "batch size: 'lots' is not a number; type a whole number from 1 to 359.",
        "learning rate 5 is outside 0.001 to 1; using 1.",
    ]
    assert state["message"] == "\n".join(explorer.notes)
    assert explorer.message.value == say.notes_html(explorer.notes)
    explorer.message.value = "<div>something else</div>"  # what is shown is drawn from the notes, never read back
    assert explorer.state["message"] == "\n".join(explorer.notes)


def test_an_accumulated_run_is_drawn_dashed_and_said_to_lie_on_the_whole_batch(explorer):
    explorer.set(batch_size=64)
    explorer.set(accumulation_steps=4)
    whole, split = (
        explorer.runs.runs[key].history.loss for key in sorted(explorer.runs.runs) if key[1] == 64 and key[3] in (1, 4)
    )
    gap = max(abs(a - b) for a, b in zip(whole, split))
    assert gap < 1e-4  # the mlp has no BatchNorm: the same updates
    assert (
        "Its curve (dashed) and the one of <b>mlp, batch 64, lr 0.05</b> lie on each other"
        in explorer.convergence.text.value
    )
    assert f"differ by at most {gap:.1e}" in explorer.convergence.text.value
    explorer.set(accumulation_steps=1)  # back to the whole batch: its text names the dashed twin
    assert (
        "The dashed curve of <b>mlp, batch 64 (4x16), lr 0.05</b> and this one lie on each other"
        in explorer.convergence.text.value
    )
    from batchlab.plots import plot_convergence

    shown = explorer.training.shown_runs  # what the panel draws
    fig = plot_convergence(
        [r.history for r in shown], dashed={r.history.label for r in shown if r.setting.accumulation_steps > 1}
    )
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["mlp, batch 64 (4x16), lr 0.05"] == "--" and styles["mlp, batch 64, lr 0.05"] == "-"
    legend = fig.axes[0].get_legend()
    assert {t.get_text(): h.get_linestyle() for t, h in zip(legend.get_texts(), legend.legend_handles)}[
        "mlp, batch 64 (4x16), lr 0.05"
    ] == "--"
    assert all(ax.get_yscale() == "linear" for ax in fig.axes)


def test_bad_input_is_clamped_or_refused_with_a_message(explorer):
    explorer.batch_text.value = "lots"  # typed in the box
    assert explorer.state["batch_size"] == 32 and "'lots' is not a number" in explorer.state["message"]
    assert explorer.batch_text.value == "32"
    explorer.batch_text.value = "100000"
    state = explorer.state
    assert state["batch_size"] == 359 and "using 359" in state["message"] and explorer.batch_size.value == 359
    explorer.batch_text.value = "100"  # a size between two stops of the slider
    assert explorer.batch_size.value == 100 and explorer.state["message"] == ""
    state = explorer.set(lr="fast", model="vgg", profile="0.5 GiB", accumulation_steps="two")
    assert (state["lr"], state["model"], state["profile"], state["accumulation_steps"]) == (
        0.05,
        "mlp",
        "GPU 4 GiB (simulated)",
        1,
    )
    for words in ("'fast' is not a number", "'vgg' does not exist", "'0.5 GiB' is not one of", "'two'"):
        assert words in state["message"]
    state = explorer.set(lr=50, accumulation_steps=-3)
    assert state["lr"] == 1.0 and state["accumulation_steps"] == 1 and "using 1." in state["message"]
    state = explorer.set(batch_size=90, accumulation_steps=4)
    assert state["accumulation_steps"] == 3 and "micro-batches of 30" in state["message"]
    with pytest.raises(
        ValueError,
        match="set\\(\\) takes batch_size, lr, model, profile, accumulation_steps, precision and checkpointing",
    ):
        explorer.set(colour="red")  # a misspelt name is a programming error


def test_a_newer_change_cancels_the_older_run_and_only_it_draws(small_digits):
    widget = BatchSizeExplorer(small_digits, model="mlp", batch_size=16, panels=("convergence", "speed"))
    with widget.quietly():
        widget.model.value = "resnet18"
    widget.batch_size.value = 2  # a resnet18 run of 40 steps starts in the background
    deadline = time.monotonic() + 60
    while (
        not (widget.state["run"] == "resnet18, batch 2, lr 0.05" and widget.state["steps"] >= 2)
        and time.monotonic() < deadline
    ):  # it has drawn its first points
        time.sleep(0.05)
    assert widget.state["running"]
    with widget.jobs.drawing:  # no drawing can slip in between the change and the mark
        widget.model.value = "mlp"  # changing the model while a run is in flight
        mark = len(widget.training.draws)
    for batch_size in (4, 8, 16):  # rapid slider changes
        widget.batch_size.value = batch_size
    assert widget.wait(60)
    state = widget.state
    assert state["run"] == "mlp, batch 16, lr 0.05" and not state["running"]
    assert set(list(widget.training.draws)[mark:]) <= {
        "mlp, batch 4, lr 0.05",
        "mlp, batch 8, lr 0.05",
        "mlp, batch 16, lr 0.05",
    }
    assert {key[0] for key in widget.runs.runs} == {"mlp"}  # the cancelled resnet18 run was dropped
    assert len(explorer_threads()) == 1  # every run, cancelled or not, ran in the explorer's one thread
    widget.close()
    assert not explorer_threads()


def test_results_already_computed_are_reused(explorer):
    first = explorer.training.run_shown
    explorer.set(batch_size=64)
    assert explorer.training.run_shown is not first
    state = explorer.set(batch_size=32)
    assert explorer.training.run_shown is first  # not trained again
    assert state["runs"] == ["mlp, batch 64, lr 0.05", "mlp, batch 32, lr 0.05"]
    point = explorer.memory_view.shown[0]
    explorer.set(batch_size=64)
    explorer.set(batch_size=32)
    assert explorer.memory_view.shown[0] is point


def test_failed_runs_are_shown_not_raised(small_digits):
    widget = BatchSizeExplorer(small_digits, model="resnet18", batch_size=1, panels="convergence")
    widget.wait(60)
    state = widget.state
    assert state["error"] and "could not train resnet18, batch 1" in state["error"]
    assert "Could not train" in widget.convergence.text.value
    widget.close()


def test_two_hundred_changes_leave_memory_and_threads_as_they_were(small_digits):
    widget = BatchSizeExplorer(small_digits, model="mlp", batch_size=32, profile="GPU 4 GiB (simulated)")
    sizes, lrs = (16, 32, 64, 128, 256), [0.01 * 1.05**i for i in range(60)]
    controls = [
        (widget.batch_size, sizes),
        (widget.lr, lrs),
        (widget.profile, list(widget.profiles)[:3]),
        (widget.model, ("mlp", "cnn", "mlp", "cnn_bn")),
    ]

    def change(i):  # one control at a time, as fast as the kernel takes them; a pause now and then
        control, values = controls[i % len(controls)]
        control.value = values[i // len(controls) % len(values)]
        if i % 10 == 9:
            widget.wait()

    for i in range(40):  # warm up: caches fill, lazy imports and allocator pools settle
        change(i)
    widget.wait()
    gc.collect()
    before = psutil.Process().memory_info().rss
    for i in range(40, 240):
        change(i)
    widget.wait()
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    assert grown < 50 * 2**20, f"200 changes grew the resident memory by {grown / 2**20:.1f} MiB"
    assert len(explorer_threads()) == 1 and not widget.jobs.running  # one thread for every change
    assert len(widget.runs.runs) <= 64 and len(widget.cache.points) <= 256
    widget.close()
    assert not explorer_threads()


def test_chosen_panels_only(small_digits):
    widget = BatchSizeExplorer(small_digits, model="mlp", batch_size=16, panels=("convergence", "speed"))
    state = widget.set(batch_size=64)
    assert state["peak_bytes"] is None and state["fits"] is None and state["samples_per_second"] > 0
    assert widget.memory.box not in widget.box.children and widget.profile not in widget.box.children[1].children
    with pytest.raises(ValueError, match="panels must name some of memory, convergence, speed"):
        BatchSizeExplorer(small_digits, panels=("loss",))
    with pytest.raises(ValueError, match="profile: device '0.5 GiB' is not one of the profiles"):
        BatchSizeExplorer(small_digits, profile="0.5 GiB")  # less than the CUDA context
    widget.close()


def test_close_closes_only_the_explorers_own_widgets_and_refuses_work_after(small_digits):
    import ipywidgets

    mine = ipywidgets.IntSlider()  # a learner's own widget
    first = BatchSizeExplorer(small_digits, model="mlp", batch_size=32, panels="memory")
    second = BatchSizeExplorer(small_digits, model="mlp", batch_size=16, panels="memory")
    owned = [first.box, first.batch_size, first.memory.image, first.convergence.text, first.message]
    first.close()
    assert all(w.comm is None for w in owned)  # closed, the panels it did not show too
    assert mine.comm is not None and second.box.comm is not None and second.batch_size.comm is not None
    assert second.set(batch_size=64)["batch_size"] == 64  # the other explorer still works
    latest = first.jobs.latest
    first.batch_size.value = 64  # a control change after close...
    assert first.jobs.latest is latest and not first.jobs.running and first.state["batch_size"] == 32  # ...does nothing
    with pytest.raises(RuntimeError, match="BatchSizeExplorer is closed: .* create a new one"):
        first.set(batch_size=8)
    first.close()  # twice: nothing more to do
    second.close()
    mine.close()


@pytest.mark.parametrize("shape", [None, (3,), (3, 224), (3, 0, 224), "3x224x224", (3.0, 224, 224)])
def test_a_bad_image_shape_is_refused_when_the_explorer_is_built(small_digits, shape):
    with pytest.raises(
        ValueError,
        match=r"image_shape must be \(channels, height, width\), three positive whole "
        r"numbers such as \(3, 224, 224\), got ",
    ):
        BatchSizeExplorer(small_digits, panels="memory", image_shape=shape)


def test_resnet18_at_batch_1_says_why_it_cannot_train_and_the_memory_search_ends(small_digits):
    widget = BatchSizeExplorer(small_digits, model="resnet18", batch_size=1, profile="4 GiB")
    state = widget.state
    assert state["error"] == (
        "could not train resnet18, batch 1, lr 0.05: resnet18 cannot train on batches of 1 "
        "sample: its BatchNorm layers need 2 or more samples per (micro-)batch in training, to "
        "compute a mean and a variance over the batch. Choose a batch of 2 or more (or fewer "
        "accumulation steps)."
    )
    assert "BatchNorm layers need 2 or more samples" in widget.convergence.text.value
    assert state["fits"] and state["largest_batch"] > 1  # the search ended...
    assert "Searching" not in widget.memory.text.value and "The largest batch that fits" in widget.memory.text.value
    other = RuntimeError("boom")
    assert say.explain_training_error(other, er.RunSetting("mlp", 1, 0.05)) is other
    widget.close()


def test_every_explorer_is_built_from_the_shared_machinery():
    from batchlab import widgets

    for cls in (widgets.ConvergenceExplorer, widgets.LoaderExplorer, widgets.AccumulationExplorer, BatchSizeExplorer):
        assert issubclass(cls, widgets.Explorer)
    assert batchlab.BatchSizeExplorer is BatchSizeExplorer
    accumulation = widgets.AccumulationExplorer(
        datasets.digits(train=False), effective_batch=16, micro_batch=4, steps=2
    )
    assert isinstance(accumulation.jobs, Jobs) and accumulation.panel.image is accumulation.image
    assert accumulation.set(micro_batch=8)["accumulation_steps"] == 2


def test_precision_and_checkpointing_change_the_memory_panel_as_the_estimator_says(small_digits):
    widget = BatchSizeExplorer(small_digits, model="resnet18", batch_size=32, profile="4 GiB", panels="memory")
    try:
        fp32 = widget.state
        bf16 = widget.set(precision="bf16")
        both = widget.set(checkpointing="every block")
        shape = (32, 3, 224, 224)
        model = batchlab.explorer.meta_model("resnet18", shape[1:])
        batch = ex.meta_batch(32, shape[1:])
        for state, kwargs in (
            (fp32, {}),
            (bf16, dict(precision="bf16")),
            (both, dict(precision="bf16", checkpointing="blocks")),
        ):
            assert state["peak_bytes"] == batchlab.estimate_memory(model, batch, **kwargs).peak_bytes
        assert both["peak_bytes"] < bf16["peak_bytes"] < fp32["peak_bytes"]
        assert (both["precision"], both["checkpointing"]) == ("bf16", "every block")
        assert both["largest_batch"] > fp32["largest_batch"]  # the levers let a larger batch fit
        refused = widget.set(precision="fp8")
        assert (
            refused["precision"] == "bf16"
            and "precision 'fp8' is not one of 'fp32', 'bf16', 'fp16'" in refused["message"]
        )
    finally:
        widget.close()
    with pytest.raises(ValueError, match="precision must be one of"):
        BatchSizeExplorer(small_digits, panels="memory", precision="half")
