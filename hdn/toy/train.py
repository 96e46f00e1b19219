"""Train the small U-Net of :mod:`hdn.toy.models` with an SSI or HDN loss, from a notebook or a shell.

From Python::

    from hdn.toy.train import TrainConfig, train
    result = train(TrainConfig(loss="hdn-dr", levels=3, steps=500, out_dir="runs/dr"))
    result.metrics["abs_rel"], result.metrics["fine_detail_error"]

From a shell::

    python -m hdn.toy.train --loss hdn-dr --levels 3 --steps 500 --out runs/dr
    python -m hdn.toy.train --loss hdn-dr --levels 3 --steps 1000 --out runs/dr --resume

The losses see the per-scene scaled and shifted ground truth ``gt`` of
:mod:`hdn.toy.synthetic`; the final evaluation compares the prediction with the metric
``depth`` of the test split after least-squares alignment in depth space
(:func:`hdn.metrics.zero_shot_metrics`), plus :func:`hdn.metrics.fine_detail_error`.

Reproducibility: the model is initialised from ``seed``; the batch of step ``s`` (data
order, random crops and flips, random contexts) is drawn from a ``torch.Generator``
seeded by ``(seed, s)``, so a run resumed from a checkpoint repeats exactly the steps an
uninterrupted run would take, and two runs on the same CPU give identical weights.

Distributed data parallel (DDP)::

    torchrun --nproc_per_node=2 -m hdn.toy.train --loss hdn-dr --steps 500 --out runs/dr

Under ``torchrun`` (``WORLD_SIZE > 1``), or when the caller has already initialised a
``torch.distributed`` process group, every rank draws the same global batch of
``batch_size`` images and keeps its share, ``DistributedSampler``-style (rank ``r`` of
``W`` takes positions ``r, r + W, ...``; ``batch_size`` must be a multiple of ``W``).
The backend is gloo on the CPU and nccl on a GPU (``cuda:LOCAL_RANK``). Each rank's loss
is the sum over its pixels (``reduction="sum"``) divided by the valid pixels of the whole
global batch (an all-reduce), times ``W`` because DDP averages the gradients over ranks:
for the fixed hierarchies and SSI the step is then the single-process step on the global
batch. (The pooled random variants draw their contexts per rank, and the gradient-matching
term's per-scale counts are per rank, so there the run is close to, not equal to, a
single-process one.) The logged loss is reduced over ranks; rank 0 alone writes the
checkpoint (the unwrapped model's weights, interchangeable with single-process runs) and
``metrics.json`` and evaluates the test split, and every rank returns its metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from hdn import contexts as _contexts
from hdn.losses import gradient_matching_loss, hdn_loss, ssi_loss
from hdn.metrics import fine_detail_error, zero_shot_metrics
from hdn.toy.models import UNet
from hdn.toy.synthetic import load_split, toy_split

__all__ = [
    "LOSS_NAMES",
    "TrainConfig",
    "TrainResult",
    "main",
    "make_loss",
    "predict",
    "train",
]

#: Loss names accepted by :func:`make_loss` and ``--loss``.
LOSS_NAMES = ("ssi", "hdn-dr", "hdn-dp", "hdn-ds", "hdn-rdi", "hdn-rc")

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"

# Options that must not change when a run is resumed: they change what the steps compute.
_RESUME_KEYS = (
    "loss", "levels", "batch_size", "lr", "weight_decay", "seed", "grad_matching",
    "crop", "hflip", "base", "depth",
)  # fmt: skip

LossFn = Callable[..., Tensor]

_RANDOM_CONTEXTS = {"hdn-rdi": _contexts.random_depth_intervals, "hdn-rc": _contexts.random_crops}
"""The random variants of :func:`make_loss`: loss name -> context sampler."""


def make_loss(name: str, levels: int = 3) -> LossFn:
    """The training loss called ``name``, as ``loss(pred, target, mask, generator=None, reduction="mean")``.

    - ``"ssi"``: :func:`hdn.ssi_loss` (image-level normalisation; ``levels`` is ignored);
    - ``"hdn-dr"``, ``"hdn-dp"``, ``"hdn-ds"``: :func:`hdn.hdn_loss` with depth-range,
      depth-percentile or spatial-grid contexts over ``levels`` levels;
    - ``"hdn-rdi"``, ``"hdn-rc"``: random depth intervals / random crops
      (:func:`hdn.contexts.random_depth_intervals`, :func:`hdn.contexts.random_crops`),
      ``2**levels - 2`` random contexts plus the whole image, so as many contexts as DR
      and DP have at ``levels``; drawn from ``generator``.

    Args:
        name: one of :data:`LOSS_NAMES`.
        levels: hierarchy depth ``L >= 1``.

    Returns:
        a callable ``(pred, target, mask, generator=None, reduction="mean") -> Tensor``
        (``reduction`` as in :func:`hdn.hdn_loss`; distributed training uses ``"sum"``).

    Examples:
        >>> g = torch.rand(2, 1, 16, 16) + 1
        >>> loss = make_loss("hdn-dp", levels=2)
        >>> float(loss(3 * g - 1, g, g > 0)) < 1e-4
        True
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"Invalid levels: we expect an int >= 1. Got: {levels!r}.")
    if name not in LOSS_NAMES:
        raise ValueError(f"Invalid loss: we expect one of {LOSS_NAMES}. Got: {name!r}.")
    sample = _RANDOM_CONTEXTS.get(name)
    num = 2**levels - 2

    def loss(
        pred: Tensor,
        target: Tensor,
        mask: Tensor | None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        if name == "ssi":
            return ssi_loss(pred, target, mask, reduction=reduction)
        if sample is None:  # a fixed hierarchy: "hdn-dr" -> context "dr"
            return hdn_loss(pred, target, mask, context=name[-2:], levels=levels, reduction=reduction)
        contexts = sample(target, mask, num=num, generator=generator)
        return hdn_loss(pred, target, mask, context=contexts, reduction=reduction)

    loss.__name__ = loss.__qualname__ = f"{name.replace('-', '_')}_loss"
    return loss


@dataclass
class TrainConfig:
    """Options of a training run (all plain values, so that it round-trips through JSON).

    Attributes:
        loss: a name of :data:`LOSS_NAMES`.
        levels: hierarchy depth of the HDN losses.
        steps: total number of optimisation steps (a resumed run continues up to it).
        batch_size: images per step.
        lr: Adam learning rate (constant).
        weight_decay: Adam weight decay.
        seed: seeds the model initialisation and every step's random draws.
        grad_matching: weight of :func:`hdn.gradient_matching_loss` (4 scales); 0 = off.
        crop: train on random ``crop x crop`` crops (divisible by ``2**depth``); None = whole images.
        hflip: random horizontal flips.
        base: channels of the first stage of the :class:`hdn.toy.models.UNet`.
        depth: number of 2x down-samplings of the :class:`hdn.toy.models.UNet`.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        data: split file used when :func:`train` gets no data; None = :func:`hdn.toy.synthetic.toy_split`.
        out_dir: where ``checkpoint.pt`` and ``metrics.json`` go; None = write nothing.
        checkpoint_every: also save a checkpoint every this many steps (0: only at the end).
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        evaluate: compute test metrics at the end.
        near_fraction: share of nearest pixels used by :func:`hdn.metrics.fine_detail_error`.
    """

    loss: str = "ssi"
    levels: int = 3
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    grad_matching: float = 0.0
    crop: int | None = None
    hflip: bool = True
    base: int = 16
    depth: int = 3
    device: str = "auto"
    data: str | None = None
    out_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    evaluate: bool = True
    near_fraction: float = 0.25

    def __post_init__(self) -> None:
        make_loss(self.loss, self.levels)  # validates loss and levels
        for name in ("steps", "batch_size", "checkpoint_every", "seed"):
            value = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: we expect an int >= {low}. Got: {value!r}.")
        if self.crop is not None and (
            isinstance(self.crop, bool)
            or not isinstance(self.crop, int)
            or self.crop < 1
            or self.crop % 2**self.depth
        ):
            raise ValueError(
                f"Invalid crop: we expect None or a positive multiple of 2**depth. Got: {self.crop!r}."
            )
        if not self.lr > 0 or self.grad_matching < 0 or self.weight_decay < 0:
            raise ValueError(
                f"Invalid lr/grad_matching/weight_decay: we expect lr > 0 and the others >= 0. "
                f"Got: {self.lr}, {self.grad_matching}, {self.weight_decay}."
            )
        if self.resume and self.out_dir is None:
            raise ValueError("Invalid resume: we need an out_dir that holds the checkpoint.")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network, in eval mode, on the training device.
        history: the training loss of every step from step 1 (resumed runs included).
        metrics: test metrics (``abs_rel``, ``delta1..3``, ``rmse``, ``fine_detail_error``),
            ``train_loss`` (mean of the last 10 steps), ``train_time_s``, ``wall_time_s``, ``steps``.
        config: the configuration of the run.
        out_dir: where the checkpoint and ``metrics.json`` were written, or None.
    """

    model: nn.Module
    history: list[float]
    metrics: dict[str, float]
    config: TrainConfig
    out_dir: Path | None = field(default=None)


# --------------------------------------------------------------------------- data


def _as_tensors(split: Mapping[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    return {
        "rgb": torch.as_tensor(split["rgb"], dtype=torch.float32).to(device),
        "gt": torch.as_tensor(split["gt"], dtype=torch.float32).unsqueeze(1).to(device),
        "depth": torch.as_tensor(split["depth"], dtype=torch.float32).unsqueeze(1).to(device),
        "valid": torch.as_tensor(split["valid"], dtype=torch.bool).unsqueeze(1).to(device),
    }


def _load_data(config: TrainConfig, data: object) -> Mapping[str, Mapping[str, np.ndarray]]:
    if data is None:
        if config.data is None:
            return toy_split()
        data = config.data
    if isinstance(data, (str, os.PathLike)):
        return load_split(data)
    if not isinstance(data, Mapping) or "train" not in data:
        raise ValueError(
            "Invalid data: we expect a path or a mapping {'train': split, 'test': split} of "
            f"hdn.toy.synthetic splits. Got: {type(data).__name__}."
        )
    return data


def _seed_of(*words: int) -> int:
    """A 64-bit seed mixed from integers (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Indices of the batch of ``step``: a slice of the endless sequence of per-epoch permutations."""
    start = step * batch_size
    chunks, position = [], start
    while position < start + batch_size:
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, 1, epoch)))
        take = min(n - offset, start + batch_size - position)
        chunks.append(perm[offset : offset + take])
        position += take
    return torch.cat(chunks)


def _draw_batch(
    train: Mapping[str, Tensor],
    step: int,
    config: TrainConfig,
    generator: torch.Generator,
    rank: int = 0,
    world: int = 1,
):
    """The batch of ``step``; with ``world > 1`` rank ``rank``'s share of the global batch
    (positions ``rank, rank + world, ...``), every random draw made for the global batch."""
    n = train["rgb"].shape[0]
    index = _batch_indices(step, n, config.batch_size, config.seed)
    H, W = train["rgb"].shape[-2:]
    tops = lefts = flip = None
    if config.crop is not None:
        if config.crop > min(H, W):
            raise ValueError(
                f"Invalid crop: we expect at most the image size {H} x {W}. Got: {config.crop}."
            )
        tops = torch.randint(0, H - config.crop + 1, (len(index),), generator=generator)[rank::world].tolist()
        lefts = torch.randint(0, W - config.crop + 1, (len(index),), generator=generator)[rank::world].tolist()
    if config.hflip:
        flip = (torch.rand(len(index), generator=generator) < 0.5)[rank::world]
    index = index[rank::world].to(train["rgb"].device)
    rgb, gt, valid = train["rgb"][index], train["gt"][index], train["valid"][index]
    if tops is not None:
        c = config.crop
        rgb, gt, valid = (
            torch.stack(
                [x[i, :, t : t + c, s : s + c] for i, (t, s) in enumerate(zip(tops, lefts))]
            )
            for x in (rgb, gt, valid)
        )
    if flip is not None:
        flip = flip.to(rgb.device).view(-1, 1, 1, 1)
        rgb, gt, valid = (torch.where(flip, x.flip(-1), x) for x in (rgb, gt, valid))
    return rgb, gt, valid


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, rgb: Tensor | np.ndarray, batch_size: int = 32) -> Tensor:
    """Run ``model`` in eval mode on ``rgb`` ``(N, 3, H, W)`` in batches; returns ``(N, 1, H, W)`` on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rgb = torch.as_tensor(rgb, dtype=torch.float32)
    out = [
        model(rgb[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(rgb), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 1, *rgb.shape[-2:])


def _evaluate(
    model: nn.Module, test: Mapping[str, Tensor], near_fraction: float
) -> dict[str, float]:
    pred = predict(model, test["rgb"])
    depth, valid = test["depth"].cpu(), test["valid"].cpu()
    metrics = zero_shot_metrics(pred, depth, valid, space="depth")
    metrics["fine_detail_error"] = float(
        fine_detail_error(pred, depth, valid, near_fraction=near_fraction, space="depth")
    )
    return metrics


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, model, optimizer, step, config, history, train_seconds) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": asdict(config),
        "history": torch.tensor(history, dtype=torch.float64),
        "train_seconds": float(train_seconds),
        "rng_state": torch.get_rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving never leaves a broken checkpoint


def _check_resumable(saved: Mapping[str, object], config: TrainConfig) -> None:
    current = asdict(config)
    changed = [
        f"{k}: {saved.get(k)!r} -> {current[k]!r}"
        for k in _RESUME_KEYS
        if saved.get(k) != current[k]
    ]
    if changed:
        raise ValueError(
            "Invalid resume: the checkpoint was trained with other options ("
            + "; ".join(changed)
            + ")."
        )


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: CUDA is not available. Got: {name!r}.")
    return device


@dataclass
class _Distributed:
    """This process's place in a distributed run (``world = 1``: a single process)."""

    rank: int = 0
    world: int = 1
    created: bool = False  # the process group was made here (and is destroyed here)


def _setup_distributed(device: torch.device) -> tuple[_Distributed, torch.device]:
    """Join the caller's process group, or make one under ``torchrun`` (``WORLD_SIZE > 1``):
    nccl for CUDA (device ``cuda:LOCAL_RANK``), gloo for the CPU."""
    if dist.is_available() and dist.is_initialized():
        info = _Distributed(dist.get_rank(), dist.get_world_size())
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        info = _Distributed(dist.get_rank(), dist.get_world_size(), created=True)
    else:
        return _Distributed(), device
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", info.rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return info, device


# --------------------------------------------------------------------------- training


def train(
    config: TrainConfig,
    data: Mapping[str, Mapping[str, np.ndarray]] | str | os.PathLike | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`hdn.toy.models.UNet` with ``config.loss`` and evaluate it on the test split.

    Each step draws a batch (see the module docstring), computes
    ``loss(pred, gt, valid) + grad_matching * gradient_matching_loss(pred, gt, valid)``
    and takes an Adam step. Deterministic algorithms are switched on for the duration of
    the call (with ``warn_only=True``) and switched back afterwards.

    Args:
        config: the options.
        data: ``{"train": split, "test": split}`` as returned by :func:`hdn.toy.synthetic.load_split`
            (arrays ``rgb``, ``gt``, ``depth``, ``valid``), a path to such a file, or None
            for ``config.data`` (None: :func:`hdn.toy.synthetic.toy_split`).
        progress: show a tqdm progress bar.

    Returns:
        a :class:`TrainResult`. With ``config.out_dir`` set, ``checkpoint.pt`` (model,
        optimizer, step, config, loss history, RNG state; readable with
        ``torch.load(path, weights_only=True)``) and ``metrics.json`` are written there.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"Invalid config: we expect a TrainConfig. Got: {type(config).__name__}.")
    wall_start = time.perf_counter()
    parallel, device = _setup_distributed(_resolve_device(config.device))
    if config.batch_size % parallel.world:
        raise ValueError(
            f"Invalid batch_size: we expect a multiple of the {parallel.world} ranks. Got: {config.batch_size}."
        )
    try:
        return _train(config, data, progress, parallel, device, wall_start)
    finally:
        if parallel.created:
            dist.destroy_process_group()


def _train(config, data, progress, parallel, device, wall_start) -> TrainResult:
    splits = _load_data(config, data)
    train_set = _as_tensors(splits["train"], device)
    test_set = _as_tensors(splits["test"], torch.device("cpu")) if "test" in splits else None
    if len(train_set["rgb"]) == 0:
        raise ValueError("Invalid data: the train split is empty.")
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    checkpoint = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    lead = parallel.rank == 0

    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
            torch.manual_seed(config.seed)
            model = UNet(
                in_channels=train_set["rgb"].shape[1], base=config.base, depth=config.depth
            ).to(device)
            optimizer = torch.optim.Adam(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
            loss_fn = make_loss(config.loss, config.levels)
            step, history, train_seconds = 0, [], 0.0
            if config.resume and checkpoint is not None and checkpoint.exists():
                state = torch.load(checkpoint, map_location="cpu", weights_only=True)
                _check_resumable(state["config"], config)
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                step, history = int(state["step"]), state["history"].tolist()
                train_seconds = float(state["train_seconds"])
                torch.set_rng_state(state["rng_state"])
            history, train_seconds = _run_steps(
                model,
                optimizer,
                loss_fn,
                train_set,
                config,
                step,
                history,
                train_seconds,
                checkpoint,
                progress and lead,
                parallel,
            )
        model.eval()
        metrics: dict[str, float] = {}
        if lead and config.evaluate and test_set is not None and len(test_set["rgb"]):
            metrics.update(_evaluate(model, test_set, config.near_fraction))
        if parallel.world > 1:  # rank 0's evaluation, for every rank
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = dict(shared[0])
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = (
            previous[2],
            previous[3],
        )

    tail = history[-10:]
    metrics["train_loss"] = float(np.mean(tail)) if tail else math.nan
    metrics["steps"] = len(history)
    metrics["train_time_s"] = train_seconds
    metrics["wall_time_s"] = time.perf_counter() - wall_start
    if out_dir is not None and lead:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {**metrics, "device": str(device), "config": asdict(config), "world_size": parallel.world}
        (out_dir / METRICS_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return TrainResult(
        model=model, history=history, metrics=metrics, config=config, out_dir=out_dir
    )


def _run_steps(
    model, optimizer, loss_fn, train_set, config, step, history, train_seconds, checkpoint, progress,
    parallel: _Distributed | None = None,
):
    """The optimisation loop from ``step`` to ``config.steps``; saves checkpoints on the way
    (rank 0 only in a distributed run)."""
    parallel = parallel or _Distributed()
    model.train()
    network = model
    if parallel.world > 1:
        device = next(model.parameters()).device
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    bar = tqdm(
        total=config.steps, initial=min(step, config.steps), desc=config.loss, disable=not progress
    )
    start = time.perf_counter()
    try:
        while step < config.steps:
            generator = torch.Generator().manual_seed(_seed_of(config.seed, 2, step))
            rgb, gt, valid = _draw_batch(train_set, step, config, generator, parallel.rank, parallel.world)
            pred = network(rgb)
            if parallel.world > 1:
                loss, logged = _distributed_loss(loss_fn, pred, gt, valid, generator, config, parallel.world)
            else:
                loss = loss_fn(pred, gt, valid, generator=generator)
                if config.grad_matching > 0:
                    loss = loss + config.grad_matching * gradient_matching_loss(
                        pred, gt, valid, scales=4
                    )
                logged = loss.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history.append(float(logged))
            bar.update(1)
            if step % 10 == 0 or step == config.steps:
                bar.set_postfix(loss=f"{np.mean(history[-10:]):.4f}")
            due = config.checkpoint_every and step % config.checkpoint_every == 0
            if checkpoint is not None and (due or step == config.steps):
                if parallel.rank == 0:
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    elapsed = train_seconds + time.perf_counter() - start
                    _save_checkpoint(checkpoint, model, optimizer, step, config, history, elapsed)
                if parallel.world > 1:
                    dist.barrier()  # the checkpoint is complete before any rank reads it
    finally:
        bar.close()
    return history, train_seconds + time.perf_counter() - start


def _distributed_loss(loss_fn, pred, gt, valid, generator, config, world):
    """This rank's objective and the global batch's loss (for the log).

    The losses normalise by the valid pixels of the batch they see; on a rank that is its
    share. Here each rank sums its pixel losses (``reduction="sum"``) and divides by the
    valid pixels of the global batch (all-reduced), times ``world`` since DDP averages the
    gradients: the gradients are those of the global batch's loss."""
    n_valid = torch.count_nonzero(valid & torch.isfinite(gt)).to(torch.float64).reshape(1)
    dist.all_reduce(n_valid)
    scale = world / max(float(n_valid), 1.0)
    loss = loss_fn(pred, gt, valid, generator=generator, reduction="sum") * scale
    if config.grad_matching > 0:
        loss = loss + config.grad_matching * scale * gradient_matching_loss(pred, gt, valid, scales=4, reduction="sum")
    logged = (loss.detach() / world).to(torch.float64).reshape(1)
    dist.all_reduce(logged)
    return loss, logged


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    p = argparse.ArgumentParser(
        prog="python -m hdn.toy.train", description="Train the small U-Net with an SSI/HDN loss."
    )
    p.add_argument("--loss", choices=LOSS_NAMES, default=defaults["loss"])
    p.add_argument("--levels", type=int, default=defaults["levels"])
    p.add_argument("--steps", type=int, default=defaults["steps"])
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--weight-decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--seed", type=int, default=defaults["seed"])
    p.add_argument(
        "--grad-matching", type=float, default=defaults["grad_matching"], metavar="WEIGHT"
    )
    p.add_argument("--crop", type=int, default=None, help="train on random crops of this size")
    p.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    p.add_argument("--base", type=int, default=defaults["base"], help="U-Net width")
    p.add_argument("--depth", type=int, default=defaults["depth"], help="U-Net depth")
    p.add_argument("--device", default=defaults["device"], help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--data", default=None, help="split file (default: hdn.toy.synthetic.toy_split())"
    )
    p.add_argument("--out", default=None, help="output folder for checkpoint.pt and metrics.json")
    p.add_argument("--checkpoint-every", type=int, default=defaults["checkpoint_every"])
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-eval", action="store_true", help="skip the test metrics")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Command-line entry point: ``python -m hdn.toy.train --loss hdn-dr --levels 3 --steps 500 --out runs/dr``."""
    args = _parser().parse_args(argv)
    config = TrainConfig(
        loss=args.loss, levels=args.levels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed, grad_matching=args.grad_matching, crop=args.crop,
        hflip=not args.no_hflip, base=args.base, depth=args.depth, device=args.device, data=args.data,
        out_dir=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume, evaluate=not args.no_eval,
    )  # fmt: skip
    result = train(config, progress=not args.no_progress)
    print(json.dumps(result.metrics, indent=2))
    return result


if __name__ == "__main__":
    main()
