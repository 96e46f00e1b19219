"""Notebook 05's training explorer: move the context kind and level L, see what a network learned.

Every position of the controls is a training run of :mod:`hdn.toy.experiments.level_sweep`
(committed rows; context kind DR, DP or DS, L = 1-4, three seeds, the relief setting of
notebook 06). :class:`SweepExplorer` reads the rows only, so a move redraws without training:

- the training curves of the chosen kind, every L in a light line and the chosen L bold
  (test relief error and training loss against the step), with the positive control dashed;
- the final relief error against L for each kind, mean and 95 % t-interval over the seeds,
  the chosen position circled;
- one kept test scene: its image, depth, the chosen model's prediction (aligned to the depth
  by least squares), the high-pass relief of the near objects' interiors in the ground truth
  and in the prediction (:func:`hdn.metrics.relief_maps`, where the losses differ), and the
  contexts of the chosen kind's finest level, ``L - 1``.

:func:`train_live` trains one position live, with a progress bar and a live curve.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from hdn import contexts as _contexts
from hdn.alignment import align_least_squares
from hdn.metrics import relief_maps
from hdn.toy.experiments import fine_detail as _fd
from hdn.toy.experiments import level_sweep as _sweep
from hdn.workbook._live import (
    LiveFigure,
    canvas_png,
    masked_map,
    one_torch_thread,
    png_message,
    update_map,
)
from hdn.workbook.plotting import _CONTEXT_COLOURS, NONE_COLOR, draw_grid, show_contexts, show_map
from hdn.workbook.training_explorer import CONTEXT_TITLES

__all__ = [
    "ALL_SEEDS",
    "LEVEL_COLOURS",
    "SUMMARY_COLUMNS",
    "SweepData",
    "SweepExplorer",
    "train_live",
]

SUMMARY_COLUMNS = ("relief", "low", "high", "vs SSI", "low", "high", "AbsRel", "delta1",
                   "grad share", "pixel share")  # fmt: skip
"""Headers of :meth:`SweepData.summary`'s columns."""

ALL_SEEDS = "all seeds"
"""The seed control's value that averages the curves over the seeds."""

LEVEL_COLOURS = {1: "#555555", 2: "#1f77b4", 3: "#2ca02c", 4: "#d62728"}
"""One colour per level L in the curves (L = 1, image-level SSI, in grey)."""

KIND_MARKERS = {"dr": "o", "dp": "s", "ds": "^"}


class SweepData:
    """The sweep's rows arranged by (kind, L, seed), with the kept test scenes; no widgets.

    Args:
        rows: rows of :mod:`hdn.toy.experiments.level_sweep` (default: the committed ones).

    Attributes:
        seeds: the seeds that have every position of the slider and the control.
        scenes: the kept test scenes, ``{"rgb": (S, 3, H, W), "depth", "near": (S, 1, H, W)}``.
    """

    def __init__(self, rows: Sequence[dict] | None = None):
        rows = _sweep.load_rows() if rows is None else list(rows)
        self.rows = rows
        positions = [(k, lv) for k in _sweep.KINDS for lv in _sweep.LEVELS] + [(None, 1)]
        self.seeds = tuple(
            s
            for s in sorted({r["config"]["seed"] for r in rows})
            if all(_sweep.find_row(rows, k, lv, s) is not None for k, lv in positions)
        )
        if not self.seeds:
            raise ValueError(
                "Invalid rows: we expect every slider position and the control for at least "
                f"one seed. Got: {len(rows)} rows without such a seed."
            )
        first = self.row("dr", 1, self.seeds[0])
        config = _fd.RunConfig(**first["config"])
        kept = config.kept_scenes
        if kept == 0:
            raise ValueError("Invalid rows: we expect rows that kept test predictions.")
        self.scenes = _fd.make_test_set(_fd.RunConfig(tilt=config.tilt, test_scenes=kept))
        self._relief: dict[tuple, dict[str, Tensor]] = {}
        self._ids: dict[tuple, Tensor] = {}

    def row(self, kind: str | None, level: int, seed: int) -> dict:
        """The row of a position (``kind=None``: the control) and seed."""
        row = _sweep.find_row(self.rows, kind, level, seed)
        if row is None:
            raise ValueError(
                f"Invalid position: no row for kind {kind!r}, L = {level}, seed {seed!r}."
            )
        return row

    def _seeds(self, seed: int | str) -> tuple[int, ...]:
        if seed == ALL_SEEDS:
            return self.seeds
        if seed not in self.seeds:
            raise ValueError(
                f"Invalid seed: we expect one of {self.seeds} or {ALL_SEEDS!r}. Got: {seed!r}."
            )
        return (seed,)

    def curve(self, kind: str | None, level: int, seed: int | str) -> dict[str, np.ndarray]:
        """``{"step", "loss", "relief_error_plane"}`` of a position; the seeds' mean for
        ``ALL_SEEDS``."""
        curves = [self.row(kind, level, s)["curve"] for s in self._seeds(seed)]
        return {
            key: np.mean([[p[key] for p in c] for c in curves], axis=0)
            for key in ("step", "loss", "relief_error_plane")
        }

    def metric(self, kind: str | None, level: int, name: str = "relief_error_plane") -> list[float]:
        """A final metric of a position, one value per seed (``seeds`` order)."""
        return [self.row(kind, level, s)["metrics"][name] for s in self.seeds]

    def interval(
        self, kind: str | None, level: int, name: str = "relief_error_plane"
    ) -> tuple[float, float, float]:
        """``(mean, low, high)``: a metric's mean over the seeds and its 95 % t-interval."""
        return _fd.paired_t_interval(self.metric(kind, level, name))

    def paired(
        self, kind: str | None, level: int, name: str = "relief_error_plane"
    ) -> tuple[float, float, float]:
        """``(mean, low, high)`` of a metric's paired difference to SSI (L = 1) over the seeds,
        with its 95 % t-interval (notebook 06's evidence standard)."""
        ssi = self.metric("dr", 1, name)
        return _fd.paired_t_interval([x - y for x, y in zip(self.metric(kind, level, name), ssi)])

    def summary(self) -> dict[str, list[float]]:
        """One row per position (SSI, kind and L, the control): the relief error's mean and
        95 % interval over the seeds, its paired difference to SSI with interval, the means of
        AbsRel and delta_1, and the near interiors' share of the gradient at the last logged
        step next to their share of the pixels."""
        out = {}
        positions = [("SSI (L = 1)", "dr", 1)]
        positions += [
            (f"{k.upper()}, L = {lv}", k, lv) for k in _sweep.KINDS for lv in _sweep.LEVELS[1:]
        ]
        positions += [("control (object)", None, 1)]
        for label, kind, level in positions:
            mean, low, high = self.interval(kind, level)
            diff = self.paired(kind, level) if (kind, level) != ("dr", 1) else (0.0, 0.0, 0.0)
            shares = [self.row(kind, level, s)["grad_share"][-1] for s in self.seeds]
            out[label] = [
                mean, low, high, *diff,
                float(np.mean(self.metric(kind, level, "abs_rel"))),
                float(np.mean(self.metric(kind, level, "delta1"))),
                float(np.mean([g["near_interior_grad_share"] for g in shares])),
                float(np.mean([g["near_interior_pixel_share"] for g in shares])),
            ]  # fmt: skip
        return out

    def prediction(self, kind: str | None, level: int, seed: int, scene: int) -> Tensor:
        """A kept test prediction ``(H, W)``, aligned to the scene's depth by least squares."""
        pred = torch.from_numpy(
            _fd.kept_predictions(self.row(kind, level, seed))[scene].astype(np.float32)
        )
        return align_least_squares(pred[None].double(), self.scenes["depth"][scene].double())[0][0]

    def relief(self, kind: str | None, level: int, seed: int, scene: int) -> dict[str, Tensor]:
        """:func:`hdn.metrics.relief_maps` of a kept prediction: ``"target"``, ``"pred"``,
        ``"interior"``, each ``(H, W)``."""
        key = (kind, level, seed, scene)
        if key not in self._relief:
            pred = _fd.kept_predictions(self.row(kind, level, seed))[scene].astype(np.float32)
            maps = relief_maps(
                torch.from_numpy(pred)[None],
                self.scenes["depth"][scene],
                self.scenes["near"][scene],
                sigma=_fd.SIGMA,
                erode=_fd.ERODE,
            )
            self._relief[key] = {k: v[0] for k, v in maps.items()}
        return self._relief[key]

    def context_ids(self, kind: str, level: int, scene: int) -> Tensor:
        """The contexts of ``kind``'s finest level ``level - 1`` on a kept scene, ``(H, W)``."""
        key = (kind, level, scene)
        if key not in self._ids:
            depth = self.scenes["depth"][scene]
            ctx = _contexts.build(kind, depth, torch.isfinite(depth), levels=level)
            self._ids[key] = ctx.level_ids(level - 1)[0]
        return self._ids[key]


class SweepExplorer:
    """The training explorer: a context-kind control, a level slider (L = 1-4), a seed control
    (one seed or ``ALL_SEEDS``) and a test-scene control over :class:`SweepData`.

    Attributes:
        kind: the context-kind control (an ipywidgets ``Dropdown``).
        level: the slider of the number of levels L (an ipywidgets ``IntSlider``).
        seed: the seed control, one seed or ``ALL_SEEDS`` (an ipywidgets ``Dropdown``).
        scene: the test-scene control (an ipywidgets ``Dropdown``).
        output: the ipywidgets ``Output`` the figure is drawn into.
        widget: the controls and the output in a ``VBox``; show it to use the explorer.
        figure: the figure.
        renders: how many times the callbacks drew.
        seconds: each redraw's time in seconds.

    Examples:
        >>> ex = SweepExplorer()                                   # doctest: +SKIP
        >>> ex.kind.value, ex.level.value = "ds", 4                # doctest: +SKIP
    """

    def __init__(
        self,
        data: SweepData | None = None,
        *,
        kind: str = "dr",
        level: int = 3,
        seed: int | str = ALL_SEEDS,
        scene: int = 0,
    ):
        import ipywidgets as widgets

        self.data = data = SweepData() if data is None else data
        self.kind = widgets.Dropdown(
            options=[(CONTEXT_TITLES[k], k) for k in _sweep.KINDS],
            value=kind,
            description="contexts",
        )
        self.level = widgets.IntSlider(
            value=level,
            min=min(_sweep.LEVELS),
            max=max(_sweep.LEVELS),
            description="levels L",
            continuous_update=False,
        )
        self.seed = widgets.Dropdown(
            options=[ALL_SEEDS, *data.seeds], value=seed, description="seed"
        )
        self.scene = widgets.Dropdown(
            options=list(range(data.scenes["depth"].shape[0])),
            value=scene,
            description="test scene",
        )
        self.output = widgets.Output()
        controls = (self.kind, self.level, self.seed, self.scene)
        self.widget = widgets.VBox([widgets.HBox(list(controls)), self.output])
        self.renders = 0
        self.seconds: list[float] = []
        self._live: tuple[_SweepPanels, LiveFigure] | None = None
        self.figure: Figure | None = None
        for control in controls:
            control.observe(self.on_change, names="value")
        self.on_change()

    def state(self) -> tuple[str, int, int | str, int]:
        """The controls' values ``(kind, level, seed, scene)``."""
        return self.kind.value, self.level.value, self.seed.value, self.scene.value

    def render(self, kind: str, level: int, seed: int | str = ALL_SEEDS, scene: int = 0) -> Figure:
        """A new figure of one position (what the widget shows), e.g. for a static copy."""
        with one_torch_thread():
            return _SweepPanels(self.data, kind, level, seed, scene).figure

    def on_change(self, change: dict | None = None) -> None:
        """Redraw the figure for the controls' values (only the artists that change)."""
        start = time.perf_counter()
        with one_torch_thread():
            if self._live is None:
                panels = _SweepPanels(self.data, *self.state())
                self._live = (
                    panels,
                    LiveFigure(panels.figure, panels.dynamic, freeze=panels.curve_axes),
                )
            else:
                self._live[0].update(*self.state())
            panels, live = self._live
            png = live.png()
        self.figure = panels.figure
        self.renders += 1
        self.output.outputs = (png_message(png, self.figure.get_suptitle()),)
        self.seconds.append(time.perf_counter() - start)


class _SweepPanels:
    """The explorer's figure; :meth:`update` changes its artists in place."""

    def __init__(self, data: SweepData, kind: str, level: int, seed: int | str, scene: int):
        self.data = d = data
        fig = self.figure = Figure(figsize=(15.5, 7.4), layout="constrained")
        grid = fig.add_gridspec(2, 6, height_ratios=[1.0, 0.9])
        ax_relief, ax_loss, ax_metric = (
            fig.add_subplot(grid[0, 2 * i : 2 * i + 2]) for i in range(3)
        )
        self.curve_axes = (ax_relief, ax_loss)
        self.maps = [fig.add_subplot(grid[1, i]) for i in range(6)]

        # training curves: one line per L (positions of the chosen kind) and the control
        self.lines: dict[tuple[str, int], object] = {}
        for ax, key, label in (
            (ax_relief, "relief_error_plane", "test relief error (plane-aligned)"),
            (ax_loss, "loss", "training loss"),
        ):
            for lv in _sweep.LEVELS:
                (self.lines[key, lv],) = ax.plot(
                    [],
                    [],
                    color=LEVEL_COLOURS[lv],
                    label=f"L = {lv}" + (" (SSI)" if lv == 1 else ""),
                )
            (self.lines[key, 0],) = ax.plot(
                [], [], color="black", ls="--", lw=1.2, label="control (object)"
            )
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
        ax_loss.set_yscale("log")
        ax_relief.legend(fontsize=8, ncol=2, loc="upper right")
        self._limits(ax_relief, ax_loss)

        # final relief error against L, per kind, with the seeds' intervals
        for i, k in enumerate(_sweep.KINDS):
            x = np.array(_sweep.LEVELS) + (i - 1) * 0.08
            stats = np.array([d.interval(k, lv) for lv in _sweep.LEVELS])
            ax_metric.errorbar(
                x,
                stats[:, 0],
                yerr=[stats[:, 0] - stats[:, 1], stats[:, 2] - stats[:, 0]],
                marker=KIND_MARKERS[k],
                capsize=3,
                label=k.upper(),
            )
        mean, low, high = d.interval(None, 1)
        ax_metric.axhspan(low, high, color="0.85", zorder=0)
        ax_metric.axhline(mean, color="black", ls="--", lw=1.2, label="control (object)")
        ax_metric.set_xticks(_sweep.LEVELS)
        ax_metric.set_xlabel("levels L (L = 1: image-level SSI)")
        ax_metric.set_ylabel("final test relief error")
        ax_metric.set_title(f"mean and 95 % interval over seeds {list(d.seeds)}")
        (self.chosen,) = ax_metric.plot(
            [], [], "o", ms=16, mfc="none", mec="black", mew=2, label="chosen"
        )
        (self.chosen_seed,) = ax_metric.plot([], [], "*", ms=11, color="black")
        ax_metric.legend(fontsize=8, loc="upper right")
        self.metric_axes = ax_metric

        # one test scene: fixed colour scales (static colorbars), so that only images change
        sc = d.scenes
        self.depth_range = (float(sc["depth"].min()), float(sc["depth"].max()))
        blank = torch.zeros_like(sc["depth"][scene, 0])
        self.rgb = show_map(self.maps[0], sc["rgb"][scene], kind="image", title="test image")
        lo, hi = self.depth_range
        self.depth = show_map(
            self.maps[1],
            blank,
            kind="depth",
            vmin=lo,
            vmax=hi,
            colorbar=False,
            title="depth (truth)",
        )
        self.pred = show_map(
            self.maps[2], blank, kind="depth", vmin=lo, vmax=hi, title="prediction"
        )
        self.relief_images = [
            show_map(
                self.maps[3],
                blank,
                kind="normalized",
                vmin=-1,
                vmax=1,
                colorbar=False,
                legend=False,
                title="relief (truth)",
            ),
            show_map(
                self.maps[4],
                blank,
                kind="normalized",
                vmin=-1,
                vmax=1,
                legend=False,
                label="relief / max |true relief|",
                title="relief (prediction)",
            ),
        ]
        self.ids_image = show_contexts(
            self.maps[5], blank.long(), count=1, title="contexts", colorbar=False
        )
        for ax in self.maps[1:]:
            ax.set_xlabel("")
            ax.set_ylabel("")
        self.suptitle = fig.suptitle("")
        self.grid_lines: list = []
        self.update(kind, level, seed, scene)

    def _limits(self, ax_relief, ax_loss) -> None:
        d = self.data
        curves = [d.curve(k, lv, s) for k in _sweep.KINDS for lv in _sweep.LEVELS for s in d.seeds]
        curves += [d.curve(None, 1, s) for s in d.seeds]
        steps = curves[0]["step"]
        relief = np.concatenate([c["relief_error_plane"] for c in curves])
        loss = np.concatenate([c["loss"] for c in curves])
        ax_relief.set_xlim(0, steps[-1])
        ax_loss.set_xlim(0, steps[-1])
        ax_relief.set_ylim(min(relief.min(), 0.3) - 0.02, max(relief.max(), 1.0) + 0.05)
        ax_loss.set_ylim(loss.min() / 1.2, loss.max() * 1.2)

    def dynamic(self) -> list:
        """What :meth:`update` changes, in drawing order (for :class:`LiveFigure`)."""
        artists = [*self.lines.values(), self.chosen, self.chosen_seed]
        for image in (self.rgb, self.depth, self.pred, *self.relief_images, self.ids_image):
            ax = image.axes
            artists += [image, *ax.spines.values(), ax.title]
        return [*artists, *self.grid_lines, self.suptitle]

    def update(self, kind: str, level: int, seed: int | str, scene: int) -> None:
        """Show another position, seed or scene."""
        d = self.data
        if kind not in _sweep.KINDS:
            raise ValueError(f"Invalid kind: we expect one of {_sweep.KINDS}. Got: {kind!r}.")
        for key in ("relief_error_plane", "loss"):
            for lv in _sweep.LEVELS:
                c = d.curve(kind, lv, seed)
                line = self.lines[key, lv]
                line.set_data(c["step"], c[key])
                line.set_linewidth(3.0 if lv == level else 1.0)
                line.set_alpha(1.0 if lv == level else 0.35)
            c = d.curve(None, 1, seed)
            self.lines[key, 0].set_data(c["step"], c[key])
        x = level + (_sweep.KINDS.index(kind) - 1) * 0.08
        self.chosen.set_data([x], [d.interval(kind, level)[0]])
        shown_seed = d.seeds[0] if seed == ALL_SEEDS else seed
        if seed == ALL_SEEDS:
            self.chosen_seed.set_data([], [])
        else:
            self.chosen_seed.set_data(
                [x], [d.row(kind, level, seed)["metrics"]["relief_error_plane"]]
            )

        sc = d.scenes
        self.rgb.set_data(sc["rgb"][scene].permute(1, 2, 0).clamp(0, 1).numpy())
        lo, hi = self.depth_range
        update_map(self.depth, masked_map(sc["depth"][scene, 0]), lo, hi)
        update_map(self.pred, masked_map(d.prediction(kind, level, shown_seed, scene)), lo, hi)
        maps = d.relief(kind, level, shown_seed, scene)
        inside = maps["interior"]
        scale = float(maps["target"].abs().max()) or 1.0
        for image, key in zip(self.relief_images, ("target", "pred")):
            image.set_data(masked_map(maps[key] / scale, inside))
        truth = maps["target"][inside].norm()
        err = (
            float((maps["pred"] - maps["target"])[inside].norm() / truth)
            if inside.any()
            else np.nan
        )
        self.maps[4].title.set_text(f"relief (pred.), error {err:.2f}")
        self.maps[2].title.set_text(
            "prediction" + ("" if seed != ALL_SEEDS else f" (seed {shown_seed})")
        )

        ids = d.context_ids(kind, level, scene)
        count = max(int(ids.max()) + 1, 1)
        cmap = ListedColormap([_CONTEXT_COLOURS[i % len(_CONTEXT_COLOURS)] for i in range(count)])
        self.ids_image.set_data(np.ma.masked_less(ids.numpy().astype(np.int64), 0))
        self.ids_image.set_cmap(cmap.with_extremes(bad=NONE_COLOR))
        self.ids_image.set_clim(-0.5, count - 0.5)
        self.maps[5].title.set_text(f"{kind.upper()}, level {level - 1}: {count}")
        for line in self.grid_lines:
            line.remove()
        ax = self.maps[5]
        before = set(ax.lines)
        if kind == "ds" and level > 1:
            draw_grid(ax, *ids.shape, level - 1, color="black")
        self.grid_lines = [line for line in ax.lines if line not in before]
        mean, low, high = d.interval(kind, level)
        seeds = "mean of seeds" if seed == ALL_SEEDS else f"seed {seed}"
        self.suptitle.set_text(
            f"{CONTEXT_TITLES[kind]}, L = {level}: final test relief error {mean:.3f} "
            f"[{low:.3f}, {high:.3f}] over seeds (curves: {seeds}; scene {scene})"
        )


def train_live(
    kind: str,
    level: int,
    steps: int,
    *,
    seed: int = 0,
    pool: int = 1024,
    device: str | torch.device = "cpu",
    every: int | None = None,
    display: bool = True,
) -> tuple[dict, Figure]:
    """Train one slider position live, as the sweep did but shorter; returns its row and the
    final figure of its curves.

    The setting is the sweep's (:data:`hdn.toy.experiments.level_sweep.SETTING`) with
    ``steps`` steps and a pool of ``pool`` scenes; a tqdm progress bar and a curve of the
    training loss and the test relief error are updated ``every`` steps (default: 10 points).
    """
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: we expect an int >= 1. Got: {steps!r}.")
    points = 10 if every is None else max(1, steps // every)
    config = _sweep.arm_config(kind, level, seed, steps=steps, pool=pool, curve_points=points)
    fig = Figure(figsize=(9, 3), layout="constrained")
    ax_loss, ax_relief = fig.subplots(1, 2)
    handle = None
    if display:
        from IPython.display import Image
        from IPython.display import display as show
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        handle = show(Image(data=canvas_png(canvas)), display_id=True)
    bar = tqdm(total=steps, desc=f"{config.arm} L={level}", disable=not display)
    losses: list[float] = []
    curve: list[dict] = []

    def callback(step: int, loss: float, point: dict | None) -> None:
        losses.append(loss)
        bar.update(1)
        if point is not None:
            curve.append(point)
            bar.set_postfix(
                loss=f"{point['loss']:.3f}", relief=f"{point['relief_error_plane']:.3f}"
            )
            if handle is not None:
                _draw_live(ax_loss, ax_relief, losses, curve)
                from IPython.display import Image

                canvas.draw()
                handle.update(Image(data=canvas_png(canvas)))

    try:
        row = _fd.run(config, device=device, callback=callback)
    finally:
        bar.close()
    _draw_live(ax_loss, ax_relief, losses, curve)
    return row, fig


def _draw_live(ax_loss, ax_relief, losses: list[float], curve: list[dict]) -> None:
    ax_loss.clear()
    ax_relief.clear()
    ax_loss.plot(np.arange(1, len(losses) + 1), losses, lw=0.5, alpha=0.4, color="C0")
    if curve:
        steps = [p["step"] for p in curve]
        ax_loss.plot(
            steps, [p["loss"] for p in curve], "o-", color="C0", label="mean since last point"
        )
        ax_relief.plot(steps, [p["relief_error_plane"] for p in curve], "o-", color="C3")
        ax_loss.legend(fontsize=8)
    ax_loss.set(yscale="log", xlabel="training step", ylabel="training loss")
    ax_relief.set(xlabel="training step", ylabel="test relief error (plane-aligned)")
