"""See what trained models get right and wrong at each level of a context hierarchy.

For one test image and a few trained networks, :class:`LevelExplorer` shows, at a chosen
level ``l`` of a chosen context kind (DR, DP or DS):

- the contexts of that level (``contexts.level_ids(l)``, one colour per context);
- the ground truth and the prediction normalised within those contexts,
  ``g_hat = context_normalize(g, contexts, l)`` and ``p_hat = context_normalize(p, contexts, l)``;
- the per-pixel loss of that level, ``|p_hat - g_hat|`` on the pixels that are in a context
  of the level (0 elsewhere). The HDN loss (:func:`hdn.hdn_loss`) averages these maps over
  the levels pixel by pixel; level 0 alone is the image-level SSI loss.

``widget`` is an ipywidgets ``VBox`` with a dropdown ``context`` (DR / DP / DS), a slider
``level`` and a dropdown ``model``; every change re-draws :meth:`LevelExplorer.render` (a
pure function of the three values) into ``output``. Tests set the widget values from Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor, nn

from hdn import contexts as _contexts
from hdn._validation import check_levels
from hdn.alignment import align_least_squares
from hdn.contexts import CONTEXT_NAMES, Contexts
from hdn.metrics import _nearest_pixels
from hdn.normalization import context_normalize
from hdn.workbook._live import LiveFigure, masked_map, one_torch_thread, png_message, update_map
from hdn.workbook.plotting import _CONTEXT_COLOURS, NONE_COLOR, draw_grid, show_contexts, show_map

__all__ = ["CONTEXT_TITLES", "LevelExplorer", "error_maps", "level_losses"]

CONTEXT_TITLES = {
    "dr": "DR (depth range)",
    "dp": "DP (depth percentile)",
    "ds": "DS (spatial grid)",
}
"""Display names of the context kinds offered by the explorer."""


def _image(x: Tensor | np.ndarray, name: str, channels: int | None) -> Tensor:
    """``(C, H, W)`` / ``(1, C, H, W)`` (or ``(H, W)`` / ``(1, H, W)`` when ``channels`` is None) -> CPU tensor."""
    t = torch.as_tensor(x).detach().cpu()
    if channels is None:
        while t.dim() > 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 2:
            raise ValueError(
                f"Invalid {name} shape: we expect one map (H, W) or (1, H, W). Got: {tuple(t.shape)}."
            )
        return t
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != channels:
        raise ValueError(
            f"Invalid {name} shape: we expect one image ({channels}, H, W). Got: {tuple(t.shape)}."
        )
    return t.float()


def error_maps(
    pred: Tensor, depth: Tensor, valid: Tensor | None = None, *, near_fraction: float = 0.25
) -> dict[str, Tensor]:
    """Per-pixel errors behind :func:`hdn.metrics.zero_shot_metrics` and
    :func:`hdn.metrics.fine_detail_error` (depth space), for figures.

    Args:
        pred: predictions ``(B, 1, H, W)`` or ``(B, H, W)`` (affine depth).
        depth: metric depth of the same shape; non-finite or <= 0 = invalid.
        valid: optional bool mask.
        near_fraction: share of the valid pixels, nearest first, in the near region.

    Returns:
        ``(B, H, W)`` maps: ``"aligned"`` (prediction aligned to ``depth`` by least squares
        over each image's valid pixels), ``"rel_error"`` (``|d_hat - d| / d`` of it, 0 where
        invalid), ``"near"`` (bool near region: the ``ceil(f n)`` nearest valid pixels),
        ``"near_aligned"`` (aligned on the near region only) and ``"near_rel_error"`` (its
        ``|d_hat - d| / d`` on the near region, 0 elsewhere). Over an image with at least two
        near pixels, the mean of ``near_rel_error`` on ``near`` is that image's fine-detail error.

    Examples:
        >>> d = torch.tensor([[[1.0, 1.5, 1.2, 1.1, 5.0, 6.0, 7.0, 8.0]]])
        >>> maps = error_maps(2 * d + 1, d, near_fraction=0.5)
        >>> maps["near"].int().tolist(), float(maps["near_rel_error"].abs().max()) < 1e-5
        ([[[1, 1, 1, 1, 0, 0, 0, 0]]], True)
    """
    p = pred[:, 0] if pred.dim() == 4 else pred
    d = (depth[:, 0] if depth.dim() == 4 else depth).to(p.dtype)
    ok = torch.isfinite(d) & (d > 0)
    if valid is not None:
        ok = ok & (valid[:, 0] if valid.dim() == 4 else valid).bool()
    safe_d = torch.where(ok, d, torch.ones_like(d))
    B = p.shape[0]
    near, _ = _nearest_pixels(safe_d.reshape(B, -1), ok.reshape(B, -1), float(near_fraction))
    near = near.view_as(ok)
    with torch.no_grad():
        aligned = align_least_squares(p, safe_d, ok)[0]
        near_aligned = align_least_squares(p, safe_d, near)[0]
    return {
        "aligned": aligned,
        "rel_error": torch.where(ok, (aligned - safe_d).abs() / safe_d, 0.0),
        "near": near,
        "near_aligned": near_aligned,
        "near_rel_error": torch.where(near, (near_aligned - safe_d).abs() / safe_d, 0.0),
    }


def level_losses(
    pred: Tensor, target: Tensor, valid: Tensor | None = None, *, kind: str = "dr", levels: int = 3
) -> list[float]:
    """The loss of each level of a hierarchy on its own, over a batch.

    At level ``l``: the sum over the batch of ``|p_hat - g_hat|`` on the pixels in a context
    of that level, divided by the number of valid pixels (the normalisation of
    :func:`hdn.hdn_loss`). Level 0 is the image-level SSI loss (for DR and DP without the
    maximum-depth pixels, which are in no bin); :func:`hdn.hdn_loss` mixes the levels pixel
    by pixel.

    Args:
        pred: ``(B, 1, H, W)`` or ``(B, H, W)`` predictions.
        target: ground truth of the same shape; non-finite = invalid.
        valid: optional bool mask.
        kind: ``"dr"``, ``"dp"`` or ``"ds"``.
        levels: hierarchy depth ``L``.

    Returns:
        ``L`` floats, level 0 first.

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> [round(v, 4) for v in level_losses(3 * g + 1, g, kind="ds", levels=2)]
        [0.0, 0.0]
    """
    check_levels(levels)
    ctx = _contexts.build(kind, target, valid, levels=levels)
    mask = ctx.valid
    count = mask.sum().clamp(min=1)
    p = pred.detach()
    losses = []
    for lvl in range(levels):
        inside = ctx.level_ids(lvl) >= 0
        diff = (
            context_normalize(p, ctx, lvl, mask) - context_normalize(target, ctx, lvl, mask)
        ).abs()
        losses.append(float(torch.where(inside, diff, 0.0).sum() / count))
    return losses


class LevelExplorer:
    """Contexts, normalised maps and per-pixel loss of one level, for several trained models.

    Args:
        models: name -> trained network mapping ``(1, 3, H, W)`` RGB to ``(1, 1, H, W)``.
        rgb: the test image, ``(3, H, W)`` in ``[0, 1]``.
        gt: its ground-truth depth ``(H, W)`` (metres, or any positive scale and shift of
            them: the normalised maps do not change); non-finite = invalid.
        valid: optional bool mask ``(H, W)``.
        levels: hierarchy depth ``L``; the level slider runs over ``0 .. L-1``.
        kinds: context kinds offered, from ``("dr", "dp", "ds")``.

    Attributes:
        context: the context-kind control (an ipywidgets ``Dropdown``).
        level: the level slider (an ipywidgets ``IntSlider``).
        model: the model control (an ipywidgets ``Dropdown``).
        output: the ipywidgets ``Output`` the figure is drawn into.
        widget: the controls and the output in a ``VBox``; show it to use the explorer.
        figure: the last rendered figure.
        renders: how many times the callbacks drew.

    Examples:
        >>> from hdn.toy.models import UNet
        >>> torch.manual_seed(0) is not None
        True
        >>> g = torch.linspace(1.0, 4.0, 256).view(16, 16)
        >>> ex = LevelExplorer({"untrained": UNet(base=8, depth=2)}, torch.rand(3, 16, 16), g, levels=3)
        >>> ex.context.value = "ds"
        >>> ex.level.value = 2
        >>> int(ex.level_ids("ds", 2).max()) + 1  # a 4 x 4 grid
        16
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        rgb: Tensor | np.ndarray,
        gt: Tensor | np.ndarray,
        valid: Tensor | np.ndarray | None = None,
        *,
        levels: int = 4,
        kinds: Sequence[str] = CONTEXT_NAMES,
    ):
        import ipywidgets as widgets

        check_levels(levels)
        if not isinstance(models, Mapping) or not models:
            raise ValueError("Invalid models: we expect a non-empty mapping name -> nn.Module.")
        kinds = tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(CONTEXT_NAMES):
            raise ValueError(
                f"Invalid kinds: we expect distinct names from {CONTEXT_NAMES}. Got: {kinds!r}."
            )
        self.rgb = _image(rgb, "rgb", 3)
        g = _image(gt, "gt", None).to(torch.float32)
        if g.shape != self.rgb.shape[1:]:
            raise ValueError(
                f"Invalid gt shape: we expect rgb's {tuple(self.rgb.shape[1:])}. Got: {tuple(g.shape)}."
            )
        v = torch.isfinite(g)
        if valid is not None:
            v = v & _image(valid, "valid", None).bool()
        self.gt, self.valid = g, v
        self.levels, self.kinds, self.names = levels, kinds, tuple(models)
        with one_torch_thread():
            self.preds = {name: self._predict(net) for name, net in models.items()}
        self._contexts: dict[str, Contexts] = {}
        self._maps: dict[tuple[str, int, str], tuple[Tensor, Tensor, Tensor]] = {}
        self._vmax: dict[tuple[str, int], float] = {}
        self._g_hat: dict[tuple[str, int, None], Tensor] = {}
        self._ids: dict[tuple[str, int], Tensor] = {}
        self._live: tuple[_LevelPanels, LiveFigure] | None = None
        for kind in kinds:  # every map up front (small images, one thread), so no move computes
            for lvl in range(levels):
                self.loss_vmax(kind, lvl)

        self.context = widgets.Dropdown(
            options=[(CONTEXT_TITLES[k], k) for k in kinds], value=kinds[0], description="contexts"
        )
        self.level = widgets.IntSlider(
            value=min(2, levels - 1),
            min=0,
            max=levels - 1,
            description="level",
            continuous_update=False,
        )
        self.model = widgets.Dropdown(
            options=list(self.names), value=self.names[0], description="model"
        )
        self.output = widgets.Output()
        self.widget = widgets.VBox(
            [widgets.HBox([self.context, self.level, self.model]), self.output]
        )
        self.figure: Figure | None = None
        self.renders = 0
        for control in (self.context, self.level, self.model):
            control.observe(self.on_change, names="value")
        self.on_change()

    # --- state -------------------------------------------------------------------------

    def _predict(self, net: nn.Module) -> Tensor:
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"Invalid models: we expect nn.Module values. Got: {type(net).__name__}."
            )
        was_training = net.training
        net.eval()
        try:
            device = next(net.parameters()).device
            with torch.no_grad():
                pred = net(self.rgb[None].to(device)).float().cpu()
        finally:
            net.train(was_training)
        return _image(pred, "model output", None)

    def contexts(self, kind: str) -> Contexts:
        """The contexts of ``kind`` for the test image (built once)."""
        if kind not in self.kinds:
            raise ValueError(f"Invalid context: we expect one of {self.kinds}. Got: {kind!r}.")
        if kind not in self._contexts:
            self._contexts[kind] = _contexts.build(
                kind, self.gt[None], self.valid[None], levels=self.levels
            )
        return self._contexts[kind]

    def level_ids(self, kind: str, level: int) -> Tensor:
        """Context index of every pixel at ``level``, ``(H, W)`` int64, -1 = in no context."""
        self._check_level(level)
        key = (kind, level)
        if key not in self._ids:
            ctx = self.contexts(kind)
            with one_torch_thread():
                self._ids[key] = ctx.level_ids(level)[0]
        return self._ids[key]

    def maps(self, kind: str, level: int, model: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(g_hat, p_hat, loss)`` at ``level``, each ``(H, W)``; loss = ``|p_hat - g_hat|``
        on the pixels in a context of the level, 0 elsewhere."""
        self._check_level(level)
        if model not in self.preds:
            raise ValueError(f"Invalid model: we expect one of {self.names}. Got: {model!r}.")
        key = (kind, level, model)
        if key not in self._maps:
            ctx = self.contexts(kind)
            inside = (self.level_ids(kind, level) >= 0) & self.valid
            with one_torch_thread():
                g_key = (kind, level, None)  # the ground truth's maps do not depend on the model
                if g_key not in self._g_hat:
                    self._g_hat[g_key] = context_normalize(self.gt[None], ctx, level, self.valid[None])[0]
                g_hat = self._g_hat[g_key]
                p_hat = context_normalize(self.preds[model][None], ctx, level, self.valid[None])[0]
                loss = torch.where(inside, (p_hat - g_hat).abs(), 0.0)
            self._maps[key] = (g_hat, p_hat, loss)
        return self._maps[key]

    def level_loss(self, kind: str, level: int, model: str) -> float:
        """Mean of ``|p_hat - g_hat|`` over the valid pixels at ``level`` (pixels in no context count 0)."""
        return float(self.maps(kind, level, model)[2][self.valid].mean())

    def loss_by_level(self, kind: str) -> dict[str, list[float]]:
        """``{model: [level_loss at level 0, 1, ..., L-1]}`` for one context kind."""
        return {
            m: [self.level_loss(kind, lvl, m) for lvl in range(self.levels)] for m in self.names
        }

    # --- drawing -----------------------------------------------------------------------

    def render(self, context: str, level: int, model: str) -> Figure:
        """Draw one level for one model.

        Panels (in ``figure.axes`` order, colorbars after them): the RGB image; the contexts
        of the level (``level_ids``); ``g_hat``; ``p_hat`` (same colour range as ``g_hat``);
        ``|p_hat - g_hat|`` with its mean in the title. The loss colour range is the same for
        every model at a given context kind and level, so switching models compares like
        with like.

        Returns:
            A :class:`matplotlib.figure.Figure` (not managed by pyplot).
        """
        with one_torch_thread():
            return _LevelPanels(self, context, level, model).figure

    def loss_vmax(self, kind: str, level: int) -> float:
        """99th percentile of the level's loss over all models' valid pixels."""
        key = (kind, level)
        if key not in self._vmax:
            values = torch.cat([self.maps(kind, level, m)[2][self.valid] for m in self.names])
            with one_torch_thread():
                top = float(torch.quantile(values.double(), 0.99)) if values.numel() else 1.0
            self._vmax[key] = max(top, 1e-6)
        return self._vmax[key]

    # --- widget callbacks --------------------------------------------------------------

    def on_change(self, change: dict | None = None) -> None:
        """Re-render the selected (context, level, model) into ``output``.

        The widget keeps one figure, laid out once; later calls change its images and texts
        in place and redraw only those (:class:`~hdn.workbook._live.LiveFigure`).
        The PNG goes straight into the ``Output`` widget's ``outputs`` state, so the callback
        behaves the same in a kernel, under nbval and in plain Python.
        """
        state = (self.context.value, self.level.value, self.model.value)
        with one_torch_thread():
            if self._live is None:
                panels = _LevelPanels(self, *state)
                self._live = (panels, LiveFigure(panels.figure, panels.dynamic))
            else:
                self._live[0].update(*state)
            panels, live = self._live
            png = live.png()
        self.figure = panels.figure
        self.renders += 1
        self.output.outputs = (png_message(png, self.figure.get_suptitle()),)

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.levels:
            raise ValueError(
                f"Invalid level: we expect an int 0 <= level < {self.levels}. Got: {level!r}."
            )


class _LevelPanels:
    """The figure of :meth:`LevelExplorer.render`, whose artists :meth:`update` changes in place."""

    def __init__(self, explorer: LevelExplorer, context: str, level: int, model: str):
        self.ex = ex = explorer
        fig = self.figure = Figure(figsize=(16.5, 3.2), layout="constrained")
        axes = self.axes = fig.subplots(1, 5)
        g_hat, p_hat, loss = ex.maps(context, level, model)
        ids = ex.level_ids(context, level)
        count = ex.contexts(context).contexts_per_image(level)
        show_map(axes[0], ex.rgb, kind="image", title="test image (RGB)")
        self.ids_image = show_contexts(axes[1], ids, count=count, title="contexts")
        inside = (ids >= 0) & ex.valid
        self.g_image = show_map(axes[2], g_hat, kind="normalized", valid=inside, vmin=-1, vmax=1,
                                title=r"ground truth $\hat g$ (per context)")  # fmt: skip
        self.p_image = show_map(axes[3], p_hat, kind="normalized", valid=inside, vmin=-1, vmax=1,
                                title="prediction")  # fmt: skip
        self.loss_image = show_map(axes[4], loss, kind="loss", valid=ex.valid, vmax=1.0, title="loss")
        self.suptitle = fig.suptitle("")
        self.grid_lines: list = []
        self.counts: dict[tuple[str, int], int] = {}
        self.update(context, level, model)

    def dynamic(self) -> list:
        """What :meth:`update` changes, in drawing order (for :class:`~hdn.workbook._live.LiveFigure`)."""
        artists = [self.ids_image, *self.grid_lines, *self.axes[1].spines.values(), self.axes[1].title,
                   self.ids_image.colorbar.ax]
        for image in (self.g_image, self.p_image, self.loss_image):
            legend = image.axes.get_legend()
            artists += [image, *image.axes.spines.values(), *([] if legend is None else [legend]),
                        image.axes.title, image.colorbar.ax]
        return [*artists, self.suptitle]

    def update(self, context: str, level: int, model: str) -> None:
        """Show another (context kind, level, model)."""
        ex, axes = self.ex, self.axes
        g_hat, p_hat, loss = ex.maps(context, level, model)
        ids = ex.level_ids(context, level)
        inside = (ids >= 0) & ex.valid
        if (context, level) not in self.counts:
            self.counts[context, level] = ex.contexts(context).contexts_per_image(level)
        count = self.counts[context, level]
        H, W = ids.shape
        k = max(count, 1)  # as show_contexts colours them
        cmap = ListedColormap([_CONTEXT_COLOURS[i % len(_CONTEXT_COLOURS)] for i in range(k)])
        self.ids_image.set_data(np.ma.masked_less(ids.numpy().astype(np.int64), 0))
        self.ids_image.set_cmap(cmap.with_extremes(bad=NONE_COLOR))
        self.ids_image.set_clim(-0.5, k - 0.5)
        self.ids_image.colorbar.set_ticks(np.arange(k) if k <= 16 else np.linspace(0, k - 1, 5).round())
        axes[1].title.set_text(f"{count} context(s) at level {level}")
        for line in self.grid_lines:
            line.remove()
        before = set(axes[1].lines)
        if context == "ds":
            draw_grid(axes[1], H, W, level, color="black")
        self.grid_lines = [line for line in axes[1].lines if line not in before]

        lim = float(g_hat[inside].abs().max()) if inside.any() else 1.0
        lim = lim or 1.0
        update_map(self.g_image, masked_map(g_hat, inside), -lim, lim)
        update_map(self.p_image, masked_map(p_hat, inside), -lim, lim)
        axes[3].title.set_text(rf"prediction $\hat p$ ({model})")
        update_map(self.loss_image, masked_map(loss, ex.valid), 0.0, ex.loss_vmax(context, level))
        axes[4].title.set_text(rf"$|\hat p - \hat g|$, mean {ex.level_loss(context, level, model):.3f}")
        self.suptitle.set_text(
            f"{CONTEXT_TITLES[context]}, level {level} of 0-{ex.levels - 1}, model '{model}'"
        )
