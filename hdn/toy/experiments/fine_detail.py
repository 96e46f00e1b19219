"""Does HDN keep fine near detail? A pre-registered ablation on scenes with learnable relief.

The experiment of notebook 06. It ran twice; each attempt was pre-registered before its
comparison arms ran. One command makes every committed row of attempt 2
(``results/fine_detail_attempt2.jsonl``)::

    python -m hdn.toy.experiments.fine_detail --shard 0/2 &   # two single-thread workers
    python -m hdn.toy.experiments.fine_detail --shard 1/2

and ``--attempt 1`` the rows of attempt 1 (``results/fine_detail.jsonl``).

Each run (an arm x a seed) trains :class:`hdn.toy.models.UNet` on scenes of
:mod:`hdn.toy.relief` and appends one JSON row (configuration, metrics, per-test-scene primary
metric, gradient shares, wall time, host, torch version, git commit) to
the attempt's file in ``hdn/toy/experiments/results/``. The command is resumable: a run whose row is
already in the file is skipped. Runs are ordered seed by seed, so an interrupted sweep leaves
complete pairs.

Attempt 1's pre-registration (fixed before its comparison ran; notebook 06 repeats it):

- **Arms.** ``ssi`` (image-level SSI), ``hdn-dr``, ``hdn-dp``, ``hdn-ds`` (:func:`hdn.hdn_loss`,
  ``L = 3`` levels as in notebook 05 and the paper's default), and the **positive control**
  ``object``: SSI over the whole image plus SSI over each near object's eroded interior
  (label contexts, :func:`hdn.contexts_loss`), a loss that certainly rewards the relief.
  Random-context variants are left out of this experiment.
- **Seeds** 0-4 for every arm; the seed fixes the initialisation, the training pool and the
  batch order, so arms are paired by seed.
- **Training.** 32 x 32 scenes, a pool of 1024 training scenes per seed drawn at run time,
  batch 8, Adam, learning rate 2e-3 with cosine decay to 0 over 600 steps, one CPU thread
  (sized to the compute budget: 25 runs in about 25 minutes on two shared cores).
- **Test set.** 128 scenes with seeds ``(999, i)``, the same for every run.
- **Primary metric.** :func:`hdn.metrics.relief_error` (sigma 2 px, erosion 2 px) on metric
  depth: 0 = the near objects' relief exact, 1 = flat.
- **Secondary metrics.** AbsRel and delta_1 after image-level least-squares alignment in depth,
  and notebook 05's :func:`hdn.metrics.fine_detail_error`.
- **Decision rule.** For each HDN arm X, the per-seed paired difference
  ``relief_error(X) - relief_error(SSI)``: "X keeps finer near detail than SSI" if the mean
  over the 5 seeds is < 0 and its 95 % t-interval excludes 0; "X loses near detail" if > 0
  with an interval that excludes 0; otherwise "no difference shown". A bootstrap interval
  over the test scenes (seed-averaged per scene) is reported alongside, as a second view of
  the same difference; it does not decide. The positive control must reach a primary metric
  below 0.5 in every seed, or the setting cannot answer the question.
- **Gradient link (notebook 04).** At a few steps the share of ``sum |dL/dp|`` inside the
  eroded near objects is logged, with the share of pixels there (what a uniform gradient
  would give).

Attempt 2's pre-registration (fixed after attempt 1 and the pilots of
``results/fine_detail_pilot2.jsonl``, before any of its comparison arms ran; notebook 06
repeats it). Attempt 1's positive control failed its gate (1.22-1.36): under the ``"affine"``
alignment the object's tilt, which a uniformly coloured object does not show, entered the
scale fit. Attempt 2 changes only what the pilots showed necessary:

- **Primary metric.** ``relief_error(..., align="plane")`` (sigma 2 px, erosion 2 px): each
  object's scale is fitted after its plane is removed. Secondary: the ``"affine"`` relief
  error of attempt 1, AbsRel, delta_1 and ``fine_detail_error``.
- **Training.** As attempt 1, but objects tilted at most 0.002 (``tilt``, against 0.01), a pool
  of 4096 scenes per seed, batch 12 and 12000 steps (cosine decay over 12000 steps), base 16.
- **Arms, seeds, test set, decision rule** as attempt 1: ``ssi``, ``hdn-dr``, ``hdn-dp``,
  ``hdn-ds`` (L = 3) and the control ``object``, seeds 0-4, the same 128 test scenes, and the
  rule above applied to the primary metric. The bootstrap over test scenes uses the per-scene
  plane-aligned errors.
- **Positive control first.** The five ``object`` rows are the 12000-step pilots (run before
  this pre-registration, with the code and options recorded in each row). The gate: the
  primary metric below 0.5 in every seed. They passed it (0.390-0.442).
- **Disparity add-on** (a secondary question, after the main comparison in the run order):
  ``ssi`` and ``hdn-dr`` trained on scenes whose labels are all affine in disparity
  (``disparity_fraction = 1``; a mixed fraction would make a scene's label space unknowable
  from its image, a different question), seeds 0-4, otherwise the same. Read by the same
  rule for ``hdn-dr - ssi``; AbsRel and delta_1 are then computed in inverse depth. It has
  no positive control of its own.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hdn import contexts as _contexts
from hdn.losses import contexts_loss, hdn_loss, ssi_loss
from hdn.metrics import fine_detail_error, relief_error, zero_shot_metrics
from hdn.toy.models import UNet
from hdn.toy.relief import BACKGROUNDS, make_relief_batch

__all__ = [
    "ARMS",
    "ATTEMPTS",
    "PLANE_SUMMARY",
    "RESULTS",
    "RESULTS_2",
    "RunConfig",
    "bootstrap_interval",
    "calibration_ladder",
    "complete_seeds",
    "decode_float16",
    "encode_float16",
    "interior_labels",
    "kept_predictions",
    "load_rows",
    "main",
    "make_arm_loss",
    "make_test_set",
    "paired_differences",
    "paired_t_interval",
    "parse_shard",
    "run",
    "run_and_record",
    "scene_differences",
    "select_rows",
    "verdict",
]

#: Arms of the experiment, the positive control ``object`` last.
ARMS = ("ssi", "hdn-dr", "hdn-dp", "hdn-ds", "object")

#: The committed results of attempt 1 and attempt 2 (package data).
RESULTS = Path(__file__).resolve().parent / "results" / "fine_detail.jsonl"
RESULTS_2 = RESULTS.with_name("fine_detail_attempt2.jsonl")

#: Command-line defaults of each attempt (``--attempt``); options given explicitly win.
ATTEMPTS = {
    1: {"steps": 600, "pool": 1024, "batch_size": 8, "tilt": 0.01, "out": RESULTS,
        "disparity_arms": ()},
    2: {"steps": 12000, "pool": 4096, "batch_size": 12, "tilt": 0.002, "out": RESULTS_2,
        "disparity_arms": ("ssi", "hdn-dr")},
}  # fmt: skip

TEST_SEED = 999
TEST_SCENES = 128
SIGMA, ERODE = 2.0, 2

# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """One run of the sweep (plain values, so that it round-trips through JSON).

    ``log_steps``: how many times the gradient share of the near interiors is logged.
    ``curve_points`` (0: none): how many times, evenly spaced, the training curve is logged
    (the mean training loss since the last point and the test set's plane-aligned relief
    error). ``kept_scenes`` (0: none): the predictions of the first ``kept_scenes`` test scenes
    are kept in the row, as float16 (:func:`kept_predictions` reads them back).
    ``background``: what stands behind the near objects (:data:`hdn.toy.relief.BACKGROUNDS`;
    ``"far"``, 20-60 m, in attempts 1 and 2).
    """

    arm: str = "ssi"
    seed: int = 0
    steps: int = 600
    size: int = 32
    pool: int = 1024
    batch_size: int = 8
    lr: float = 2e-3
    base: int = 16
    levels: int = 3
    test_scenes: int = TEST_SCENES
    log_steps: int = 4
    tilt: float = 0.01
    disparity_fraction: float = 0.0
    curve_points: int = 0
    kept_scenes: int = 0
    background: str = "far"

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"Invalid arm: we expect one of {ARMS}. Got: {self.arm!r}.")
        for name in (
            "seed",
            "steps",
            "size",
            "pool",
            "batch_size",
            "base",
            "levels",
            "test_scenes",
            "log_steps",
            "curve_points",
            "kept_scenes",
        ):
            value = getattr(self, name)
            low = 0 if name in ("seed", "steps", "curve_points", "kept_scenes") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: we expect an int >= {low}. Got: {value!r}.")
        if self.size % 8:
            raise ValueError(
                f"Invalid size: we expect a multiple of 8 (U-Net depth 3). Got: {self.size}."
            )
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: we expect a number > 0. Got: {self.lr!r}.")
        tilt = self.tilt
        if isinstance(tilt, bool) or not isinstance(tilt, (int, float)) or not 0 <= tilt < 0.1:
            raise ValueError(f"Invalid tilt: we expect a number in [0, 0.1). Got: {self.tilt!r}.")
        frac = self.disparity_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise ValueError(
                f"Invalid disparity_fraction: we expect a number in [0, 1]. Got: {frac!r}."
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"Invalid background: we expect one of {BACKGROUNDS}. Got: {self.background!r}."
            )
        if self.kept_scenes > self.test_scenes:
            raise ValueError(
                f"Invalid kept_scenes: we expect at most test_scenes ({self.test_scenes}). "
                f"Got: {self.kept_scenes}."
            )

    @property
    def metric_space(self) -> str:
        """Space of the AbsRel / delta_1 fit: ``"inverse_depth"`` if most labels are disparity."""
        return "inverse_depth" if self.disparity_fraction > 0.5 else "depth"

    def key(self) -> str:
        """Identifies the run in the results file (every option that changes what it computes).

        ``disparity_fraction``, ``curve_points``, ``kept_scenes`` and ``background`` are left
        out at their defaults (0 and ``"far"``), so that rows written before the options
        existed keep their keys.
        """
        fields = asdict(self)
        for name, default in (("disparity_fraction", 0), ("curve_points", 0), ("kept_scenes", 0),
                              ("background", "far")):  # fmt: skip
            if fields[name] == default:
                del fields[name]
        return json.dumps(fields, sort_keys=True)


def interior_labels(labels: Tensor, radius: int = ERODE) -> Tensor:
    """Object labels eroded by ``radius`` px: a pixel keeps its label if its whole window has it.

    Examples:
        >>> lab = torch.full((1, 1, 7, 7), -1); lab[..., 1:6, 1:6] = 0
        >>> int((interior_labels(lab, 1) >= 0).sum())
        9
    """
    if radius == 0:
        return labels.clone()
    k = 2 * radius + 1
    x = labels.reshape(-1, 1, *labels.shape[-2:]).double()
    padded = torch.nn.functional.pad(x, (radius,) * 4, value=-1.0)
    high = torch.nn.functional.max_pool2d(padded, k, stride=1)
    low = -torch.nn.functional.max_pool2d(-padded, k, stride=1)
    keep = (high == low) & (x >= 0)
    return torch.where(keep, x, -1.0).to(labels.dtype).reshape(labels.shape)


def make_arm_loss(arm: str, levels: int = 3):
    """The loss of ``arm`` as ``loss(pred, gt, labels) -> scalar``; ``labels`` are object ids (-1: none).

    Examples:
        >>> g = torch.rand(2, 1, 16, 16) + 1
        >>> lab = torch.full((2, 1, 16, 16), -1); lab[..., 4:12, 4:12] = 0
        >>> [round(float(make_arm_loss(a)(2 * g + 1, g, lab)), 4) for a in ARMS]
        [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if arm == "ssi":
        return lambda pred, gt, labels: ssi_loss(pred, gt)
    if arm in ("hdn-dr", "hdn-dp", "hdn-ds"):
        return lambda pred, gt, labels: hdn_loss(pred, gt, context=arm[-2:], levels=levels)
    if arm == "object":

        def loss(pred: Tensor, gt: Tensor, labels: Tensor) -> Tensor:
            inner = interior_labels(labels)[:, 0]
            contexts = _contexts.from_labels([torch.zeros_like(inner), inner])
            return contexts_loss(pred, gt, None, contexts)

        return loss
    raise ValueError(f"Invalid arm: we expect one of {ARMS}. Got: {arm!r}.")


def calibration_ladder(
    batch: dict[str, Tensor], noise: float = 0.005, seed: int = 0
) -> dict[str, Tensor]:
    """Predictions of known quality for :func:`hdn.metrics.relief_error`, best first (notebook 05's ladder).

    ``exact`` (the depth), ``log depth`` (monotone, nearly affine on an object), ``noisy``
    (depth + Gaussian noise of ``noise`` m), ``box blur 3/5/9`` (k x k mean filter, which also
    smears the background into the objects' borders), ``relief removed`` (the objects' planes
    without relief) and ``flat`` (a constant).
    """
    depth = batch["depth"]
    gen = torch.Generator().manual_seed(seed)

    def box(x: Tensor, k: int) -> Tensor:
        padded = torch.nn.functional.pad(x, (k // 2,) * 4, mode="replicate")
        return torch.nn.functional.avg_pool2d(padded, k, stride=1)

    return {
        "exact": depth,
        "log depth": depth.log(),
        "noisy": depth + noise * torch.randn(depth.shape, generator=gen),
        "box blur 3": box(depth, 3),
        "box blur 5": box(depth, 5),
        "box blur 9": box(depth, 9),
        "relief removed": batch["smooth"],
        "flat": torch.ones_like(depth),
    }


def make_test_set(config: RunConfig) -> dict[str, Tensor]:
    """The fixed test scenes ``(999, i)``, ``i < config.test_scenes``."""
    seeds = [(TEST_SEED, i) for i in range(config.test_scenes)]
    return make_relief_batch(seeds, config.size, tilt=config.tilt, background=config.background)


def git_state() -> tuple[str, bool]:
    """The commit checked out and whether the tree differs from it (tracked files, the results
    folder aside: rows are appended there while runs go on); ``("unknown", False)`` outside a
    clone."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    changed = [line for line in status.splitlines() if "experiments/results/" not in line]
    return commit, bool(changed)


def _interior_share(grad: Tensor, inner: Tensor) -> tuple[float, float]:
    g = grad.detach().abs().double()
    total = float(g.sum())
    grad_share = float(g[inner].sum()) / total if total > 0 else math.nan
    return grad_share, float(inner.double().mean())


def _predict(model: torch.nn.Module, test: dict[str, Tensor]) -> Tensor:
    """The model's predictions ``(N, 1, H, W)`` of the test scenes, in eval mode, 64 at a time."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rgb = test["rgb"]
        pred = torch.cat([model(rgb[i : i + 64]) for i in range(0, rgb.shape[0], 64)])
    model.train(was_training)
    return pred


def _test_relief(pred: Tensor, test: dict[str, Tensor]) -> float:
    """The primary metric (plane-aligned relief error, mean over the test scenes) of the test
    set's predictions ``pred`` ``(N, 1, H, W)``."""
    per_scene = relief_error(pred, test["depth"], test["near"], sigma=SIGMA,
                             erode=ERODE, align="plane", reduction="none")  # fmt: skip
    return float(per_scene[~torch.isnan(per_scene)].mean())


def encode_float16(x: Tensor) -> dict:
    """``x`` as float16 in a JSON-ready dict (``shape``, base64 ``data``); :func:`decode_float16`
    reads it back.

    Examples:
        >>> decode_float16(encode_float16(torch.tensor([[1.5, -2.0]])))
        array([[ 1.5, -2. ]], dtype=float16)
    """
    a = x.detach().cpu().to(torch.float16).numpy()
    return {"dtype": "float16", "shape": list(a.shape),
            "data": base64.b64encode(a.astype("<f2").tobytes()).decode("ascii")}  # fmt: skip


def decode_float16(entry: dict) -> np.ndarray:
    """The array of :func:`encode_float16`'s ``entry``."""
    if entry.get("dtype") != "float16":
        raise ValueError(f"Invalid entry: we expect dtype 'float16'. Got: {entry.get('dtype')!r}.")
    data = np.frombuffer(base64.b64decode(entry["data"]), dtype="<f2")
    return data.reshape(entry["shape"]).astype(np.float16)


def kept_predictions(row: dict) -> np.ndarray:
    """The predictions ``(kept_scenes, H, W)`` float16 a row kept of the first test scenes."""
    if "predictions" not in row:
        raise ValueError("Invalid row: it kept no predictions (kept_scenes was 0).")
    return decode_float16(row["predictions"])


def run(
    config: RunConfig,
    *,
    device: str | torch.device = "cpu",
    callback: Callable[[int, float, dict | None], None] | None = None,
) -> dict:
    """Train and evaluate one run; returns its JSON row (see the module docstring).

    Args:
        config: the run.
        device: where to train and evaluate (``"cuda"`` where present is faster); the row
            records it. Runs on another device agree with the CPU's up to rounding, not bitwise.
        callback: called after every step as ``callback(step, loss, point)`` with the step
            (1-based), its training loss and the new training-curve point (``curve_points``),
            or None when none was logged at that step; for live progress.
    """
    device = torch.device(device)
    wall = time.perf_counter()
    commit, dirty = git_state()  # (at the start: the code that runs)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        pool = make_relief_batch(
            [(config.seed, 1, i) for i in range(config.pool)],
            config.size,
            disparity_fraction=config.disparity_fraction,
            tilt=config.tilt,
            background=config.background,
        )
        pool = {k: v.to(device) for k, v in pool.items()}
        model = UNet(base=config.base).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / max(config.steps, 1))),
        )
        loss_fn = make_arm_loss(config.arm, config.levels)
        log_at = sorted(
            {
                1,
                *(
                    round(config.steps * k / config.log_steps)
                    for k in range(1, config.log_steps + 1)
                ),
            }
        )
        curve_at = {round(config.steps * k / config.curve_points)
                    for k in range(1, config.curve_points + 1)}  # fmt: skip
        test = {k: v.to(device) for k, v in make_test_set(config).items()}
        shares, history, curve = [], [], []
        last_step_pred = None  # the test set's prediction of the last step's curve point
        start = time.perf_counter()
        for step in range(config.steps):
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            index = torch.randint(0, config.pool, (config.batch_size,), generator=gen).to(device)
            rgb, gt, labels = pool["rgb"][index], pool["gt"][index], pool["labels"][index]
            pred = model(rgb)
            pred.retain_grad()
            loss = loss_fn(pred, gt, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if step + 1 in log_at:
                grad_share, pixel_share = _interior_share(pred.grad, interior_labels(labels) >= 0)
                shares.append({"step": step + 1, "near_interior_grad_share": grad_share,
                               "near_interior_pixel_share": pixel_share})  # fmt: skip
            optimizer.step()
            schedule.step()
            history.append(float(loss.detach()))
            if step + 1 in curve_at:
                test_pred = _predict(model, test)
                since = history[curve[-1]["step"] if curve else 0 :]
                curve.append({"step": step + 1, "loss": float(np.mean(since)),
                              "relief_error_plane": _test_relief(test_pred, test)})  # fmt: skip
                if step + 1 == config.steps:
                    last_step_pred = test_pred
            if callback is not None:
                point = curve[-1] if curve and curve[-1]["step"] == step + 1 else None
                callback(step + 1, history[-1], point)
        train_time = time.perf_counter() - start
        pred = (_predict(model, test) if last_step_pred is None else last_step_pred).cpu()
    test = {k: v.cpu() for k, v in test.items()}
    depth, near = test["depth"], test["near"]
    per_scene = relief_error(pred, depth, near, sigma=SIGMA, erode=ERODE, reduction="none")
    zs = zero_shot_metrics(pred, depth, None, space=config.metric_space)
    per_scene_plane = relief_error(
        pred, depth, near, sigma=SIGMA, erode=ERODE, align="plane", reduction="none"
    )
    kept = {"predictions": encode_float16(pred[: config.kept_scenes, 0])}
    metrics = {
        "relief_error": float(per_scene[~torch.isnan(per_scene)].mean()),
        "relief_error_plane": float(per_scene_plane[~torch.isnan(per_scene_plane)].mean()),
        "abs_rel": zs["abs_rel"],
        "delta1": zs["delta1"],
        "fine_detail_error": float(
            fine_detail_error(pred, depth, None, space=config.metric_space)
        ),
        "train_loss_last50": float(np.mean(history[-50:])) if history else math.nan,
    }
    return {
        "key": config.key(),
        "config": asdict(config),
        "metrics": metrics,
        "relief_per_scene": [round(float(v), 6) for v in per_scene],
        "relief_plane_per_scene": [round(float(v), 6) for v in per_scene_plane],
        "grad_share": shares,
        **({"curve": curve} if config.curve_points else {}),
        **(kept if config.kept_scenes else {}),
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - wall, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "device": str(device),
        "git_commit": commit,
        "git_dirty": dirty,
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_rows(
    path: str | os.PathLike | None = None, *, name: str = "fine_detail.jsonl"
) -> list[dict]:
    """The rows of a results file; default: the committed results file ``name`` (package data,
    read through importlib.resources): ``fine_detail.jsonl`` (attempt 1),
    ``fine_detail_attempt2.jsonl`` (attempt 2), or the pilots ``fine_detail_pilot.jsonl`` and
    ``fine_detail_pilot2.jsonl``. A ``path`` that does not exist gives no rows."""
    if path is None:
        from importlib.resources import files

        text = files("hdn.toy.experiments").joinpath("results", name).read_text()
    else:
        p = Path(path)
        text = p.read_text() if p.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


#: :func:`run_and_record`'s default summary of a row's metrics (``str.format`` fields).
PLANE_SUMMARY = "relief_error_plane {relief_error_plane:.4f} abs_rel {abs_rel:.4f}"


def parse_shard(text: str) -> tuple[int, int]:
    """The shard ``(I, N)`` of a command line's ``--shard I/N``: every N-th run of a plan, from
    the I-th.

    Examples:
        >>> parse_shard("1/4")
        (1, 4)
    """
    try:
        shard, shards = (int(x) for x in text.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        raise ValueError(f"Invalid shard: we expect I/N with 0 <= I < N. Got: {text!r}.") from None
    return shard, shards


def run_and_record(
    config: RunConfig, out: str | os.PathLike, name: str, *, summary: str = PLANE_SUMMARY
) -> dict:
    """Run ``config``, append its row to ``out`` and print one line; returns the row.

    The line is ``"{name}: {summary} ({wall time} s)"``, ``summary`` formatted with the row's
    metrics (:data:`PLANE_SUMMARY` by default).
    """
    row = run(config)
    _append(Path(out), row)
    print(f"{name}: {summary.format(**row['metrics'])} ({row['wall_time_s']:.0f} s)", flush=True)
    return row


# --------------------------------------------------------------------------- statistics


def paired_t_interval(
    differences: Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided 95 % Student-t interval ``(mean, low, high)``.

    Examples:
        >>> [round(x, 3) for x in paired_t_interval([-0.1, -0.2, -0.15, -0.12, -0.18])]
        [-0.15, -0.201, -0.099]
    """
    if level != 0.95:
        raise ValueError(f"Invalid level: only 0.95 is tabulated. Got: {level!r}.")
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size < 2 or not np.isfinite(d).all():
        raise ValueError(
            f"Invalid differences: we expect >= 2 finite numbers. Got: {d.tolist()!r}."
        )
    df = d.size - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.960
    half = t * float(d.std(ddof=1)) / math.sqrt(d.size)
    mean = float(d.mean())
    return mean, mean - half, mean + half


def bootstrap_interval(
    differences: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-scene differences and a 95 % percentile bootstrap interval over the scenes.

    NaN entries (scenes without an object) are dropped first. Deterministic for a given ``seed``.

    Examples:
        >>> m, lo, hi = bootstrap_interval([0.1] * 10)
        >>> round(m, 3), round(lo, 3), round(hi, 3)
        (0.1, 0.1, 0.1)
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"Invalid differences: we expect >= 2 numbers. Got: {d.size}.")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"Invalid resamples: we expect an int >= 100. Got: {resamples!r}.")
    rng = np.random.Generator(np.random.PCG64(seed))
    means = d[rng.integers(0, d.size, (resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(d.mean()), float(low), float(high)


def complete_seeds(rows: Sequence[dict], arms: Iterable[str] = ARMS) -> list[int]:
    """The seeds that have a run of every arm in ``arms``, sorted: the seeds whose runs all pair.

    Examples:
        >>> runs = [("ssi", 0), ("x", 0), ("ssi", 1)]
        >>> rows = [{"config": {"arm": a, "seed": s}} for a, s in runs]
        >>> complete_seeds(rows, ("ssi", "x"))
        [0]
    """
    wanted = set(arms)
    have: dict[int, set[str]] = {}
    for r in rows:
        have.setdefault(r["config"]["seed"], set()).add(r["config"]["arm"])
    return sorted(s for s, found in have.items() if wanted <= found)


def select_rows(rows: Sequence[dict], **options) -> list[dict]:
    """The rows whose configuration has the given values (a missing field reads as its default).

    Examples:
        >>> rows = [{"config": {"arm": "ssi", "seed": 0}},
        ...         {"config": {"arm": "ssi", "seed": 0, "disparity_fraction": 1.0}}]
        >>> len(select_rows(rows, disparity_fraction=0.0)), len(select_rows(rows, arm="ssi"))
        (1, 2)
    """
    defaults = asdict(RunConfig())
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"Invalid options: we expect RunConfig fields. Got: {unknown}.")
    return [
        r for r in rows
        if all(r["config"].get(k, defaults[k]) == v for k, v in options.items())
    ]  # fmt: skip


def _by_arm_and_seed(rows: Sequence[dict]) -> dict[tuple[str, int], dict]:
    table: dict[tuple[str, int], dict] = {}
    for r in rows:
        key = (r["config"]["arm"], r["config"]["seed"])
        if key in table:
            raise ValueError(
                f"Invalid rows: two runs of arm {key[0]!r} with seed {key[1]}; "
                "select one setting first (select_rows)."
            )
        table[key] = r
    return table


def paired_differences(
    rows: Sequence[dict], arm: str, baseline: str = "ssi", metric: str = "relief_error"
) -> dict[int, float]:
    """``metric(arm) - metric(baseline)`` per seed, over the seeds that both arms have.

    Examples:
        >>> rows = [{"config": {"arm": a, "seed": s}, "metrics": {"relief_error": v}}
        ...         for a, s, v in [("ssi", 0, 0.5), ("x", 0, 0.25), ("ssi", 1, 0.5)]]
        >>> paired_differences(rows, "x")
        {0: -0.25}
    """
    table = _by_arm_and_seed(rows)
    seeds = sorted({s for a, s in table if a == arm} & {s for a, s in table if a == baseline})
    return {
        s: table[arm, s]["metrics"][metric] - table[baseline, s]["metrics"][metric] for s in seeds
    }


def scene_differences(
    rows: Sequence[dict], arm: str, baseline: str = "ssi", field: str = "relief_per_scene"
) -> np.ndarray:
    """Per test scene, ``field`` of ``arm`` minus ``baseline``, averaged over the paired seeds.

    ``field``: ``"relief_per_scene"`` (affine, attempt 1's primary metric) or
    ``"relief_plane_per_scene"`` (plane-aligned, attempt 2's).
    """
    table = _by_arm_and_seed(rows)
    seeds = sorted({s for a, s in table if a == arm} & {s for a, s in table if a == baseline})
    if not seeds:
        raise ValueError(f"Invalid arm: no seed has both {arm!r} and {baseline!r}.")
    diff = [np.asarray(table[arm, s][field]) - np.asarray(table[baseline, s][field])
            for s in seeds]  # fmt: skip
    return np.mean(diff, axis=0)


def verdict(low: float, high: float) -> str:
    """The pre-registered reading of an interval of ``X - SSI`` for the primary metric.

    Examples:
        >>> verdict(-0.3, -0.1), verdict(-0.1, 0.2), verdict(0.05, 0.2)
        ('keeps finer near detail', 'no difference shown', 'loses near detail')
    """
    if high < 0:
        return "keeps finer near detail"
    if low > 0:
        return "loses near detail"
    return "no difference shown"


# --------------------------------------------------------------------------- CLI


def _plan(
    arms: Sequence[str],
    seeds: Sequence[int],
    base: RunConfig,
    disparity_arms: Sequence[str] = (),
    disparity_fraction: float = 1.0,
) -> list[RunConfig]:
    """Every arm seed by seed, then the disparity add-on seed by seed."""
    fields = {k: v for k, v in asdict(base).items() if k not in ("arm", "seed")}
    plan = [RunConfig(arm=a, seed=s, **fields) for s in seeds for a in arms]
    fields["disparity_fraction"] = disparity_fraction
    plan += [RunConfig(arm=a, seed=s, **fields) for s in seeds for a in disparity_arms]
    return plan


def _parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m hdn.toy.experiments.fine_detail", description=__doc__.split("\n")[0]
    )
    p.add_argument("--attempt", type=int, default=2, choices=sorted(ATTEMPTS),
                   help="defaults of steps, pool, batch size, tilt, out and the disparity "
                        "add-on (ATTEMPTS)")  # fmt: skip
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--pool", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--base", type=int, default=d.base)
    p.add_argument("--test-scenes", type=int, default=d.test_scenes)
    p.add_argument("--tilt", type=float, help="largest slope of the objects' planes")
    p.add_argument("--disparity-arms", nargs="*", choices=ARMS,
                   help="arms also run with labels affine in disparity, after the others")
    p.add_argument("--disparity-fraction", type=float, default=1.0,
                   help="share of disparity-labelled scenes in the disparity add-on")
    p.add_argument("--out", help="JSONL file the rows are appended to")
    p.add_argument(
        "--shard", default="0/1", help="I/N: run every N-th run of the plan, from the I-th"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p


# The summary line of this CLI: both alignments of the primary metric.
_RELIEF_SUMMARY = (
    "relief_error {relief_error:.4f} (plane-aligned {relief_error_plane:.4f}) abs_rel {abs_rel:.4f}"
)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the planned runs that are not yet in ``--out``; returns the new rows."""
    args = _parser().parse_args(argv)
    shard, shards = parse_shard(args.shard)
    preset = ATTEMPTS[args.attempt]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    base = RunConfig(steps=args.steps, size=args.size, pool=args.pool, batch_size=args.batch_size,
                     lr=args.lr, base=args.base, test_scenes=args.test_scenes,
                     tilt=args.tilt)  # fmt: skip
    plan = _plan(args.arms, args.seeds, base, args.disparity_arms, args.disparity_fraction)
    out = Path(args.out)
    new = []
    for i, config in enumerate(plan):
        if i % shards != shard:
            continue
        if config.key() in {row["key"] for row in load_rows(out)}:
            print(f"skip {config.arm} seed {config.seed} (disparity_fraction "
                  f"{config.disparity_fraction}): already in {out}", flush=True)  # fmt: skip
            continue
        name = f"{config.arm} seed {config.seed} disp {config.disparity_fraction}"
        new.append(run_and_record(config, out, name, summary=_RELIEF_SUMMARY))
    return new


if __name__ == "__main__":
    main()
