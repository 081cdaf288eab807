"""What every explorer shares: :class:`Explorer` (controls, ``set``, ``state``, display) and :class:`Panel`.

* :class:`Explorer`, the base: controls whose changes call the widget's ``_changed``, ``set(**values)``
  (move the controls as a learner would and return when the panels have updated), ``state`` (what
  is shown now) and a short, stable ``text/plain`` for nbval;
* :class:`Panel`: a matplotlib figure rendered to PNG into a ``widgets.Image``, with a line of text
  in a ``widgets.HTML`` under it, never an ``Output`` widget, so the notebooks stay stable under
  nbval and update live in JupyterLab.
"""

from __future__ import annotations

import functools
import io
from contextlib import contextmanager

import ipywidgets as widgets

from ..plots import figure_to_png
from .jobs import Jobs

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Panel:
    """A figure (PNG in a ``widgets.Image``) above a line of text (``widgets.HTML``)."""

    def __init__(self, text: str = ""):
        self.image = widgets.Image(format="png")
        self.text = widgets.HTML(text)
        self.box = widgets.VBox([self.image, self.text])

    def draw(self, fig) -> None:
        self.image.value = figure_to_png(fig)

    def say(self, text: str) -> None:
        self.text.value = text


class Explorer:
    """What every explorer shares: controls that call ``_changed(name)``, ``set``, ``state``, display.

    A subclass builds its controls and panels, calls ``super().__init__``, and implements
    ``_changed`` (start the work: usually ``self.jobs.submit(...)``) and ``state``. ``settable``
    names the controls that ``set`` accepts, in the order its error message lists them.
    """

    settable: tuple = ()

    def __init__(self, controls: dict, children: list, *, background: bool, on_error=None):
        self.controls = controls
        self.closed = False
        self.jobs = Jobs(background=background, on_error=on_error)
        self._quiet = 0
        self.box = widgets.VBox(children)
        for name, control in controls.items():
            control.observe(functools.partial(self._on_change, name), names="value")

    def _on_change(self, name: str, _change) -> None:
        if not self._quiet and not self.closed:  # a closed explorer starts no work
            self._changed(name)

    def _changed(self, name: str | None = None) -> None:
        raise NotImplementedError

    @contextmanager
    def quietly(self):
        """Change controls without starting any work (to correct a value, or to set several at once)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def set(self, **values) -> dict:
        """Move controls as a learner would; return :attr:`state` once the panels have updated."""
        if self.closed:
            raise RuntimeError(
                f"{type(self).__name__} is closed: close() stopped its work and removed its widgets; "
                f"create a new one to explore again"
            )
        for name, value in values.items():
            if name not in self.settable:
                raise ValueError(f"set() takes {and_list(self.settable)}, got {name!r}")
            self._check(name, value)
        with self.quietly():  # several values, one update
            for name, value in values.items():
                self._apply(name, value)
        self._changed(None)
        self.wait()
        return self.state

    def _check(self, name: str, value) -> None:
        """Raise if ``set`` must refuse ``value`` for ``name`` (before any control changes)."""

    def _apply(self, name: str, value) -> None:
        self.controls[name].value = value

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the panels show the current setting (at most ``timeout`` seconds)."""
        return self.jobs.wait(timeout)

    @property
    def state(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        """Stop any work and close this explorer's own widgets (they disappear from the notebook).

        Only the widgets it built are closed (``Widget.close_all`` would close every widget of the
        kernel, a learner's own and other explorers' too). Afterwards a control change starts no work
        and ``set`` raises RuntimeError. Closing twice does nothing.
        """
        if self.closed:
            return
        self.closed = True
        self.jobs.close()  # cancels the job in flight, waits for it to stop and ends the background thread
        for widget in own_widgets(self):
            widget.close()

    def _repr_mimebundle_(self, **kwargs):
        """The live widget first (JupyterLab shows it), then a still PNG of the figures shown now, for a
        reader on GitHub or nbviewer where widgets cannot run, then a short, stable ``text/plain`` (the
        one output nbval compares: it skips the widget view and images)."""
        view = "application/vnd.jupyter.widget-view+json"
        live = self.box._repr_mimebundle_(**kwargs)
        bundle = {view: live[view]} if view in live else {}
        still = still_png(self.box)
        if still is not None:
            bundle["image/png"] = still
        bundle.update({key: value for key, value in live.items() if key not in (view, "text/plain")})
        bundle["text/plain"] = repr(self)
        return bundle


def shown_images(widget) -> list:
    """The PNG bytes of every ``widgets.Image`` inside ``widget`` that has a picture, in display order."""
    if isinstance(widget, widgets.Image):
        return [bytes(widget.value)] if widget.value and widget.format == "png" else []
    return [png for child in getattr(widget, "children", ()) for png in shown_images(child)]


def still_png(widget) -> bytes | None:
    """One PNG of the figures in ``widget`` stacked top to bottom on white (None if it shows none yet).

    An explorer's figures are already PNGs (:class:`Panel`); a still picture of them is what a notebook
    viewer without a kernel can show in place of the widget.
    """
    from PIL import Image  # Pillow comes with matplotlib, which the widgets draw with

    pictures = [Image.open(io.BytesIO(png)).convert("RGB") for png in shown_images(widget)]
    if not pictures:
        return None
    still = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
    top = 0
    for picture in pictures:
        still.paste(picture, (0, top))
        top += picture.height
    out = io.BytesIO()
    still.save(out, format="png", optimize=True)
    return out.getvalue()


def lr_slider(lr: float, **style) -> widgets.FloatLogSlider:
    """The learning-rate slider every explorer shows: 0.001 to 1 on a log scale, in quarter decades."""
    return widgets.FloatLogSlider(
        value=lr,
        base=10,
        min=-3,
        max=0,
        step=0.25,
        description="learning rate",
        continuous_update=False,
        readout_format=".3g",
        **style,
    )


def and_list(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def html_table(header, rows) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def own_widgets(explorer: Explorer) -> list:
    """Every widget ``explorer`` built: its box and the boxes' children, its controls, and the widgets and
    panels it holds as attributes (a panel that is not shown is not in the box), each once, children first."""
    found: dict = {}

    def walk(widget) -> None:
        if id(widget) in found:
            return
        for child in getattr(widget, "children", ()):
            walk(child)
        for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):  # widgets of their own
            if isinstance(part, widgets.Widget):
                walk(part)
        found[id(widget)] = widget

    roots = [explorer.box, *explorer.controls.values()]
    for value in vars(explorer).values():
        if isinstance(value, Panel):
            roots.append(value.box)
        elif isinstance(value, widgets.Widget):
            roots.append(value)
    for root in roots:
        walk(root)
    return list(found.values())
