"""A small reproduction of the paper's loss ablation on the toy RGB-D split.

Trains the U-Net of :mod:`hdn.toy.models` with every loss variant of :data:`hdn.toy.train.LOSS_NAMES`
and several seeds, evaluates each run on the test split (AbsRel, delta1 after image-level
least-squares alignment; :func:`hdn.metrics.fine_detail_error` on the nearest quarter of the
pixels), and writes one JSON row per run plus a bar figure of mean +- std per loss::

    python -m hdn.toy.experiments.toy_ablation --steps 500 --seeds 0 1 2 \\
        --losses ssi hdn-dr hdn-dp hdn-ds hdn-rdi hdn-rc --levels 3 --jobs 2 \\
        --out hdn/toy/experiments/results/toy_ablation.json \\
        --figure hdn/toy/experiments/results/toy_ablation.png

Each run trains in a worker process with one thread (``torch.set_num_threads(1)``);
``--jobs`` workers run at once. The JSON file is rewritten after every finished run, so
an interrupted ablation keeps what it has, and a second call with the same options skips
the runs already in the file (``--overwrite`` starts afresh).

(``--out`` and ``--figure`` default to the package's results folder, :data:`RESULTS_DIR`.)
From Python (the notebook), the committed files are read by name::

    from hdn.toy.experiments import load_results
    from hdn.toy.experiments.toy_ablation import format_table, summarize
    meta, rows = load_results("toy_ablation_600.json")
    print(format_table(summarize(rows)))
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from hdn.metrics import _nearest_pixels, fine_detail_error
from hdn.toy.experiments import _parse_report
from hdn.toy.synthetic import load_split, toy_split
from hdn.toy.train import LOSS_NAMES, TrainConfig, predict, train

__all__ = [
    "METRICS",
    "RESULTS_DIR",
    "ROW_KEYS",
    "format_paired_table",
    "format_table",
    "interior_fine_detail_error",
    "load_results",
    "main",
    "paired_differences",
    "plot_paired_differences",
    "plot_summary",
    "run_one",
    "summarize",
]

#: The package folder of the committed results (``hdn/toy/experiments/results/``), the CLI's
#: default output folder.
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Keys of a result row, in the order they are written.
ROW_KEYS = (
    "loss", "levels", "seed", "steps", "batch_size",
    "abs_rel", "delta1", "rmse", "fine_detail_error", "fine_detail_interior", "train_loss",
    "wall_time_s", "train_time_s", "torch", "device", "threads",
)  # fmt: skip

#: Metrics that :func:`summarize` and :func:`plot_summary` report, with "lower is better".
METRICS = {
    "abs_rel": True,
    "delta1": False,
    "fine_detail_error": True,
    "fine_detail_interior": True,
}

_LABELS = {
    "abs_rel": "AbsRel (image-level alignment)",
    "delta1": "delta1 = share with ratio < 1.25",
    "fine_detail_error": "fine-detail error (near 25 %)",
    "fine_detail_interior": "fine-detail error, near interior",
}

_SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- a diagnostic metric


def interior_fine_detail_error(
    pred: torch.Tensor,
    depth: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    near_fraction: float = 0.25,
    margin: int = 2,
) -> torch.Tensor:
    """:func:`hdn.metrics.fine_detail_error` on the *interior* of the near region.

    The near region (the ``ceil(near_fraction * n)`` nearest valid pixels of each image, as
    in :func:`~hdn.metrics.fine_detail_error`) is eroded by a ``(2 margin + 1)`` square
    window: a pixel counts only if every valid pixel around it within ``margin`` pixels is
    near as well. This drops the silhouettes of near objects, where any smooth prediction
    bleeds far depths into near pixels; those few pixels otherwise dominate the
    least-squares fit on the near region and hide the relief inside the objects. The
    prediction is then aligned by least squares on the interior pixels and scored by their
    AbsRel (``fine_detail_error(..., near_fraction=1.0)`` on the interior mask).

    Args:
        pred: ``(B, 1, H, W)`` affine depth prediction.
        depth: ``(B, 1, H, W)`` metric depth; non-finite or <= 0 = invalid.
        valid: optional bool mask of the same shape.
        near_fraction: share of the valid pixels, nearest first, in the near region.
        margin: erosion radius in pixels (``0`` = the near region itself).

    Returns:
        0-dim tensor (NaN if no image keeps 2 interior pixels).

    Examples:
        >>> d = torch.full((1, 1, 8, 8), 30.0)
        >>> d[..., :, :4] = torch.linspace(1.0, 1.5, 8).view(8, 1)  # a near slab, left half
        >>> float(interior_fine_detail_error(2 * d + 1, d, near_fraction=0.5, margin=1)) < 1e-5
        True
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"Invalid margin: we expect an int >= 0. Got: {margin!r}.")
    if depth.dim() != 4 or depth.shape[1] != 1 or pred.shape != depth.shape:
        raise ValueError(
            f"Invalid shapes: we expect pred and depth (B, 1, H, W). Got: {tuple(pred.shape)}, "
            f"{tuple(depth.shape)}."
        )
    ok = torch.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok = ok & valid.bool()
    B = depth.shape[0]
    safe = torch.where(ok, depth, 1.0)
    near, _ = _nearest_pixels(safe.reshape(B, -1), ok.reshape(B, -1), float(near_fraction))
    near = near.view_as(ok)
    if margin:
        # A valid pixel that is not near, within the window, removes the centre pixel.
        far = (ok & ~near).float()
        k = 2 * margin + 1
        touched = torch.nn.functional.max_pool2d(far, k, stride=1, padding=margin) > 0
        near = near & ~touched
    return fine_detail_error(pred, depth, near, near_fraction=1.0, space="depth")


# --------------------------------------------------------------------------- one run


def run_one(options: Mapping[str, object], threads: int = 1) -> dict[str, object]:
    """Train and evaluate one run; returns its result row (keys :data:`ROW_KEYS`).

    Args:
        options: keyword arguments of :class:`hdn.toy.train.TrainConfig` (``loss``, ``levels``,
            ``seed``, ``steps``, ...); ``out_dir`` and ``resume`` are not allowed.
        threads: ``torch.set_num_threads`` for the run (restored afterwards).
    """
    if "out_dir" in options or "resume" in options:
        raise ValueError("Invalid options: an ablation run writes no checkpoint (out_dir, resume).")
    config = TrainConfig(**options)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = train(config, progress=False)
    finally:
        torch.set_num_threads(previous)
    m = result.metrics
    if config.evaluate:
        test = (toy_split() if config.data is None else load_split(config.data))["test"]
        depth = torch.as_tensor(test["depth"], dtype=torch.float32).unsqueeze(1)
        valid = torch.as_tensor(test["valid"]).unsqueeze(1)
        pred = predict(result.model, test["rgb"])
        interior = float(
            interior_fine_detail_error(pred, depth, valid, near_fraction=config.near_fraction)
        )
    else:
        interior = math.nan
    row = {
        "loss": config.loss,
        "levels": config.levels,
        "seed": config.seed,
        "steps": int(m["steps"]),
        "batch_size": config.batch_size,
        "abs_rel": m["abs_rel"],
        "delta1": m["delta1"],
        "rmse": m["rmse"],
        "fine_detail_error": m["fine_detail_error"],
        "fine_detail_interior": interior,
        "train_loss": m["train_loss"],
        "wall_time_s": round(m["wall_time_s"], 2),
        "train_time_s": round(m["train_time_s"], 2),
        "torch": torch.__version__,
        "device": str(next(result.model.parameters()).device),
        "threads": threads,
    }
    return {k: row[k] for k in ROW_KEYS}


def _run_key(row: Mapping[str, object]) -> tuple:
    return (row["loss"], row["levels"], row["seed"], row["steps"], row["batch_size"])


def _sort_key(row: Mapping[str, object]) -> tuple:
    loss = row["loss"]
    order = LOSS_NAMES.index(loss) if loss in LOSS_NAMES else len(LOSS_NAMES)
    return (order, str(loss), row["levels"], row["steps"], row["seed"])


# --------------------------------------------------------------------------- files


def load_results(path: str | os.PathLike) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Read an ablation file at ``path``: returns ``(meta, rows)``.

    The committed files are read by name with :func:`hdn.toy.experiments.load_results`.
    """
    return _parse_report(Path(path).read_text(), path)


def _write_json(
    path: Path, meta: Mapping[str, object], rows: Iterable[Mapping[str, object]]
) -> None:
    rows = sorted(rows, key=_sort_key)
    report = {
        "meta": {k: meta[k] for k in sorted(meta)},
        "rows": [{k: row[k] for k in ROW_KEYS} for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- summary


def summarize(
    rows: Sequence[Mapping[str, object]], metrics: Sequence[str] = tuple(METRICS)
) -> list[dict[str, object]]:
    """Mean and sample standard deviation (``ddof=1``) of each metric per loss.

    Rows are grouped by ``(loss, levels, steps)``; groups come out in the order of
    :data:`hdn.toy.train.LOSS_NAMES`. A group of one run has std NaN.

    Returns:
        one dict per group with ``loss``, ``levels``, ``steps``, ``n`` (number of runs),
        ``seeds`` and, for each metric ``m``, ``m_mean`` and ``m_std``; plus
        ``wall_time_s_mean``.

    Examples:
        >>> rows = [{"loss": "ssi", "levels": 3, "steps": 9, "seed": s, "abs_rel": a,
        ...          "delta1": 0.5, "fine_detail_error": 0.1, "wall_time_s": 1.0}
        ...         for s, a in ((0, 1.0), (1, 3.0))]
        >>> table = summarize(rows)
        >>> table[0]["abs_rel_mean"], table[0]["abs_rel_std"], table[0]["n"]
        (2.0, 1.4142135623730951, 2)
    """
    groups: dict[tuple, list[Mapping[str, object]]] = {}
    for row in sorted(rows, key=lambda r: _sort_key({"seed": 0, **r})):
        groups.setdefault((row["loss"], row["levels"], row["steps"]), []).append(row)
    table = []
    for (loss, levels, steps), members in groups.items():
        entry: dict[str, object] = {
            "loss": loss,
            "levels": levels,
            "steps": steps,
            "n": len(members),
            "seeds": [r.get("seed") for r in members],
        }
        for name in (*metrics, "wall_time_s"):
            values = np.array([float(r[name]) for r in members if name in r], dtype=np.float64)
            entry[f"{name}_mean"] = float(values.mean()) if len(values) else math.nan
            if name != "wall_time_s":
                entry[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        table.append(entry)
    return table


def format_table(
    summary: Sequence[Mapping[str, object]],
    metrics: Sequence[str] = tuple(METRICS),
    digits: int | Mapping[str, int] = 3,
) -> str:
    """The summary of :func:`summarize` as an aligned text table (``mean +- std``).

    ``digits`` is the number of decimals, for all metrics or per metric name (default 3).

    Examples:
        >>> print(format_table([{"loss": "ssi", "levels": 3, "steps": 9, "n": 2,
        ...     "abs_rel_mean": 2.0, "abs_rel_std": 1.41421}], metrics=["abs_rel"]))
        loss  levels  steps  n  abs_rel
        ssi        3      9  2  2.000 +- 1.414
    """
    header = ["loss", "levels", "steps", "n", *metrics]
    lines = []
    for entry in summary:
        cells = [str(entry["loss"]), str(entry["levels"]), str(entry["steps"]), str(entry["n"])]
        for name in metrics:
            mean, std = entry[f"{name}_mean"], entry[f"{name}_std"]
            n = digits.get(name, 3) if isinstance(digits, Mapping) else digits
            cells.append(f"{mean:.{n}f} +- {std:.{n}f}")
        lines.append(cells)
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    right = {1, 2, 3}  # numbers of runs and options are right-aligned

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([fmt(header), *(fmt(c) for c in lines)])


def paired_differences(
    rows: Sequence[Mapping[str, object]],
    baseline: str = "ssi",
    metrics: Sequence[str] = tuple(METRICS),
) -> list[dict[str, object]]:
    """Differences ``loss - baseline`` of each metric between runs that share a seed.

    Runs with the same seed (and levels, steps) start from the same weights and see the same
    batches, so their difference removes most of the seed-to-seed spread. Groups come out
    in the order of :func:`summarize`, without the baseline itself.

    Returns:
        one dict per ``(loss, levels, steps)`` with ``loss``, ``levels``, ``steps``, ``seeds``
        (those that both losses ran) and, for each metric ``m``: ``m_diffs`` (one value per
        seed), ``m_mean`` and ``m_better`` (in how many seeds the loss beat the baseline;
        lower is better except for ``delta1``, see :data:`METRICS`).

    Examples:
        >>> rows = [{"loss": n, "levels": 3, "steps": 9, "seed": s, "abs_rel": a}
        ...         for n, s, a in (("ssi", 0, 1.0), ("ssi", 1, 2.0), ("hdn-dr", 0, 0.5),
        ...                         ("hdn-dr", 1, 2.5))]
        >>> d = paired_differences(rows, metrics=["abs_rel"])[0]
        >>> d["loss"], d["seeds"], d["abs_rel_diffs"], d["abs_rel_mean"], d["abs_rel_better"]
        ('hdn-dr', [0, 1], [-0.5, 0.5], 0.0, 1)
    """
    if not isinstance(baseline, str):
        raise ValueError(f"Invalid baseline: we expect a loss name. Got: {baseline!r}.")
    by_run = {(r["loss"], r["levels"], r["steps"], r["seed"]): r for r in rows}
    out = []
    for entry in summarize(rows, metrics):
        loss, levels, steps = entry["loss"], entry["levels"], entry["steps"]
        if loss == baseline:
            continue
        seeds = [s for s in entry["seeds"] if (baseline, levels, steps, s) in by_run]
        item: dict[str, object] = {"loss": loss, "levels": levels, "steps": steps, "seeds": seeds}
        for name in metrics:
            diffs = [
                float(by_run[loss, levels, steps, s][name])
                - float(by_run[baseline, levels, steps, s][name])
                for s in seeds
            ]
            lower = METRICS.get(name, True)
            item[f"{name}_diffs"] = diffs
            item[f"{name}_mean"] = float(np.mean(diffs)) if diffs else math.nan
            item[f"{name}_better"] = sum((d < 0) if lower else (d > 0) for d in diffs)
        out.append(item)
    return out


def format_paired_table(
    paired: Sequence[Mapping[str, object]],
    metrics: Sequence[str] = tuple(METRICS),
    digits: int | Mapping[str, int] = 3,
) -> str:
    """The output of :func:`paired_differences` as a text table: mean difference (wins/seeds).

    Examples:
        >>> print(format_paired_table([{"loss": "hdn-dr", "steps": 9, "seeds": [0, 1],
        ...     "abs_rel_mean": -0.25, "abs_rel_better": 2}], metrics=["abs_rel"]))
        steps  loss              d abs_rel
            9  hdn-dr  -0.250 (2/2 better)
    """
    cells = []
    for item in paired:
        row = [str(item["steps"]), str(item["loss"])]
        for name in metrics:
            n = digits.get(name, 3) if isinstance(digits, Mapping) else digits
            row.append(
                f"{item[f'{name}_mean']:+.{n}f} ({item[f'{name}_better']}/{len(item['seeds'])} better)"
            )
        cells.append(row)
    header = ["steps", "loss", *(f"d {m}" for m in metrics)]
    widths = [max(len(c) for c in column) for column in zip(header, *cells)]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    return "\n".join([fmt(header), *(fmt(r) for r in cells)])


def plot_paired_differences(
    rows: Sequence[Mapping[str, object]],
    baseline: str = "ssi",
    metrics: Sequence[str] = ("abs_rel", "delta1", "fine_detail_interior"),
    title: str | None = None,
):
    """One dot per seed: each loss's difference to ``baseline`` in each metric.

    Dots of different step counts are drawn side by side in their own colour; a dot below
    the zero line (above it for ``delta1``) is a seed where the loss beat the baseline.

    Returns:
        the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    paired = paired_differences(rows, baseline, metrics)
    losses = list(dict.fromkeys(p["loss"] for p in paired))
    steps = sorted({p["steps"] for p in paired})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.9 * len(metrics), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10")(np.arange(len(steps)) % 10)
    width = 0.6 / max(len(steps), 1)
    for ax, name in zip(axes[0], metrics):
        ax.axhline(0.0, color="k", lw=0.8)
        for j, (n_steps, color) in enumerate(zip(steps, colors)):
            for p in (p for p in paired if p["steps"] == n_steps):
                x = losses.index(p["loss"]) + (j - (len(steps) - 1) / 2) * width
                diffs = p[f"{name}_diffs"]
                label = f"{n_steps} steps" if p["loss"] == losses[0] else None
                ax.plot(np.full(len(diffs), x), diffs, "o", ms=4, color=color, label=label)
        better = "below" if METRICS.get(name, True) else "above"
        ax.set_title(f"{name} ({better} 0 = better)")
        ax.set_xticks(np.arange(len(losses)), losses, rotation=30, ha="right")
        ax.set_xlabel("training loss")
        ax.set_ylabel(f"difference to {baseline} [unitless]")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(title or f"Paired by seed: difference to {baseline}, one dot per seed")
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    return fig


def plot_summary(
    rows: Sequence[Mapping[str, object]],
    metrics: Sequence[str] = tuple(METRICS),
    title: str | None = None,
):
    """Bars of mean +- std per loss for each metric, with every run as a dot.

    Returns:
        the matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    summary = summarize(rows, metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.8 * len(metrics), 3.6), squeeze=False)
    names = [f"{e['loss']}" for e in summary]
    x = np.arange(len(summary))
    colors = plt.get_cmap("tab10")(np.arange(len(summary)) % 10)
    for ax, name in zip(axes[0], metrics):
        means = np.array([e[f"{name}_mean"] for e in summary])
        stds = np.nan_to_num(np.array([e[f"{name}_std"] for e in summary]))
        ax.bar(x, means, yerr=stds, color=colors, alpha=0.75, capsize=4, label="mean +- std")
        for i, e in enumerate(summary):
            values = [
                float(r[name])
                for r in rows
                if (r["loss"], r["levels"], r["steps"]) == (e["loss"], e["levels"], e["steps"])
            ]
            ax.plot(np.full(len(values), i), values, "k.", ms=4)
        better = "lower" if METRICS.get(name, True) else "higher"
        ax.set_title(f"{name} ({better} is better)")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_xlabel("training loss")
        ax.set_ylabel(_LABELS.get(name, name) + " [unitless]")
        ax.grid(axis="y", alpha=0.3)
    if title is None and summary:
        seeds = max(e["n"] for e in summary)
        title = (
            f"Toy ablation: mean +- std over {seeds} seed(s), "
            f"{summary[0]['steps']} steps, L = {summary[0]['levels']} (dots: single runs)"
        )
    fig.suptitle(title or "Toy ablation")
    if fig.get_layout_engine() is None:  # the workbook style already sets constrained layout
        fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hdn.toy.experiments.toy_ablation",
        description="Train every loss variant with several seeds on the toy split.",
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", choices=LOSS_NAMES, default=list(LOSS_NAMES))
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base", type=int, default=None, help="U-Net width (default: TrainConfig's)")
    p.add_argument("--depth", type=int, default=None, help="U-Net depth (default: TrainConfig's)")
    p.add_argument("--crop", type=int, default=None, help="train on random crops of this size")
    p.add_argument(
        "--data", default=None, help="split file (default: hdn.toy.synthetic.toy_split())"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, ...")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (worker processes)")
    p.add_argument("--out", default=str(RESULTS_DIR / "toy_ablation.json"))
    p.add_argument("--figure", default=str(RESULTS_DIR / "toy_ablation.png"))
    p.add_argument("--overwrite", action="store_true", help="ignore runs already in --out")
    return p


def _git_state() -> dict[str, object]:
    """Commit of the hdn checkout the runs use, and whether its ``hdn/`` has uncommitted edits."""
    root = Path(__file__).resolve().parents[3]  # the checkout that holds hdn/
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "hdn"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if head.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "python -m hdn.toy.experiments.toy_ablation " + " ".join(shlex.quote(a) for a in args)


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    """Command-line entry point; returns the rows written."""
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"Invalid --jobs: we expect an int >= 1. Got: {args.jobs}.")
    start = time.perf_counter()
    out = Path(args.out)
    common: dict[str, object] = {
        "levels": args.levels,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "device": args.device,
        "data": args.data,
    }
    for name in ("base", "depth"):
        if getattr(args, name) is not None:
            common[name] = getattr(args, name)
    # Seed-major order: if the ablation is stopped early, the finished seeds are complete.
    runs = [{"loss": loss, "seed": seed, **common} for seed in args.seeds for loss in args.losses]
    TrainConfig(**runs[0])  # fail here, not in a worker, on bad options

    rows: list[dict[str, object]] = []
    previous_elapsed = 0.0
    if out.exists() and not args.overwrite:
        old_meta, rows = load_results(out)
        previous_elapsed = float(old_meta.get("elapsed_s", 0.0))
    done = {_run_key(r) for r in rows}
    todo = [r for r in runs if _run_key(r) not in done]

    meta: dict[str, object] = {
        "command": _command_line(argv),
        "schema": _SCHEMA_VERSION,
        "losses": list(args.losses),
        "seeds": list(args.seeds),
        "steps": args.steps,
        "levels": args.levels,
        "jobs": args.jobs,
        "config": {
            k: v for k, v in asdict(TrainConfig(**runs[0])).items() if k not in ("loss", "seed")
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "complete": False,
        "elapsed_s": previous_elapsed,
        "runs_planned": len(runs),
        **_git_state(),
    }

    def save() -> None:
        meta["elapsed_s"] = round(previous_elapsed + time.perf_counter() - start, 1)
        meta["runs_done"] = sum(_run_key(r) in {_run_key(x) for x in runs} for r in rows)
        _write_json(out, meta, rows)

    save()
    print(f"{len(todo)} of {len(runs)} runs to train, {args.jobs} at a time", flush=True)
    if args.jobs == 1:
        for options in todo:
            rows.append(run_one(options))
            print(_progress_line(rows[-1]), flush=True)
            save()
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, options) for options in todo]
            for future in as_completed(futures):
                rows.append(future.result())
                print(_progress_line(rows[-1]), flush=True)
                save()
    meta["complete"] = True
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    save()
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        selected = [r for r in rows if _run_key(r) in {_run_key(x) for x in runs}]
        fig = plot_summary(selected)
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=110, metadata={"Software": None})
        plt.close(fig)
    print(format_table(summarize(rows)))
    print(f"wrote {out} ({meta['elapsed_s']:.0f} s in all)", flush=True)
    return rows


def _progress_line(row: Mapping[str, object]) -> str:
    return (
        f"{row['loss']:8s} seed {row['seed']}: abs_rel {row['abs_rel']:.3f} "
        f"delta1 {row['delta1']:.3f} fine {row['fine_detail_error']:.4f} "
        f"({row['wall_time_s']:.0f} s)"
    )


if __name__ == "__main__":
    main()
