"""Fast redraws for the workbook's widgets: one figure kept alive, only its changing artists redrawn.

A widget callback that builds a new matplotlib figure, lays it out and saves it as PNG spends
most of its time on what did not change (axes, ticks, colorbars of static panels, the layout).
:class:`LiveFigure` lays a figure out once, keeps a copy of its static pixels (Agg blitting:
the changing artists are left out of that copy) and on each :meth:`LiveFigure.png` pastes the
copy back, draws only the changing artists onto it and encodes the pixels as PNG.

:func:`one_torch_thread` runs a callback's tensor work on one thread: on a small, busy machine
PyTorch's intra-op threads wait on each other and make small operations tens of times slower.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from PIL import Image

__all__ = ["LiveFigure", "canvas_png", "masked_map", "one_torch_thread", "png_message", "update_map"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(1)``, then restore the previous count."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def masked_map(values, valid=None) -> np.ma.MaskedArray:
    """``values`` as float64 masked where non-finite or where ``valid`` is False (as ``show_map`` draws it)."""
    a = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    hidden = ~np.isfinite(a)
    if valid is not None:
        v = valid.cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)
        hidden |= ~v.astype(bool)
    return np.ma.masked_array(a, mask=hidden)


def update_map(image, shown: np.ma.MaskedArray, vmin: float, vmax: float) -> None:
    """New data and colour limits for a map drawn by ``show_map`` (its colorbar follows); the
    legend entry "no ground truth" is shown when some pixel is hidden, as ``show_map`` does."""
    from hdn.workbook.plotting import add_invalid_legend

    image.set_data(shown)
    image.set_clim(vmin, vmax)
    ax = image.axes
    hidden = bool(np.ma.getmaskarray(shown).any())
    if hidden and ax.get_legend() is None:
        add_invalid_legend(ax)
    elif not hidden and ax.get_legend() is not None:
        ax.get_legend().remove()


def canvas_png(canvas: FigureCanvasAgg, compress_level: int = 3) -> bytes:
    """The pixels ``canvas`` last drew as PNG bytes (RGB, the figure's size at its dpi).

    Examples:
        >>> canvas = FigureCanvasAgg(Figure(figsize=(1, 1), dpi=20))
        >>> canvas.draw()
        >>> canvas_png(canvas)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="png", compress_level=compress_level)
    return buffer.getvalue()


def png_message(png: bytes, text: str) -> dict:
    """The ``display_data`` output that an ``Output`` widget shows for a PNG image."""
    import base64

    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": text},
        "metadata": {},
    }


class LiveFigure:
    """A figure laid out once, whose changing artists are redrawn onto its static pixels.

    Args:
        figure: a fully drawn-up figure (all artists present, as it will be shown).
        dynamic: returns, in drawing order, the artists that can change between two calls
            of :meth:`png` (whole axes, colorbar axes, images, lines, texts, legends). It is
            called at every :meth:`png`, so artists that are replaced can be listed anew.
        freeze: axes whose data limits must stay fixed (autoscaling is switched off once
            the layout is done), e.g. because lines are added to them later.
        slack: inches added to the constrained layout's padding between panels, so that tick
            labels that grow after the (only) layout do not run into the next panel.

    Everything not listed by ``dynamic`` must stay the same, since it is drawn once only.
    The layout engine is switched off after the first draw, so later changes of text keep the
    positions of the first layout. ``figure`` itself keeps every artist drawable, so
    ``figure.savefig`` still shows the current state.

    Examples:
        >>> fig = Figure(figsize=(2, 2), dpi=50)
        >>> ax = fig.subplots()
        >>> im = ax.imshow(np.zeros((4, 4)), vmin=0, vmax=1)
        >>> live = LiveFigure(fig, lambda: [im])
        >>> im.set_data(np.ones((4, 4)))
        >>> live.png()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """

    def __init__(
        self, figure: Figure, dynamic: Callable[[], Sequence[Artist]], freeze: Sequence = (), slack: float = 0.1
    ):
        self.figure = figure
        engine = figure.get_layout_engine()
        if slack and isinstance(engine, ConstrainedLayoutEngine):
            engine.set(w_pad=engine.get()["w_pad"] + slack)
        self.canvas = FigureCanvasAgg(figure)
        self._dynamic = dynamic
        artists = list(dynamic())
        for artist in artists:
            artist.set_animated(True)  # left out of the static copy
        try:
            self.canvas.draw()
        finally:
            for artist in artists:
                artist.set_animated(False)
        figure.set_layout_engine("none")
        for artist in artists:  # titles keep the height of the first layout (x ticks are below)
            if isinstance(artist, Axes) and artist.get_title():
                artist.set_title(artist.get_title(), y=artist.title.get_position()[1])
        for ax in freeze:
            ax.set_xlim(ax.get_xlim())
            ax.set_ylim(ax.get_ylim())
            ax.set_autoscale_on(False)
        self._background = self.canvas.copy_from_bbox(figure.bbox)

    def png(self, compress_level: int = 3) -> bytes:
        """The figure's current state as PNG bytes (RGB, at the figure's dpi)."""
        self.canvas.restore_region(self._background)
        renderer = self.canvas.get_renderer()
        for artist in self._dynamic():
            artist.draw(renderer)
        return canvas_png(self.canvas, compress_level)
