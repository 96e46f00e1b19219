"""The slider sweep of notebook 05: what a network learns at each context kind and level L.

Notebook 05's training explorer moves a context kind (DR, DP, DS) and a level slider
(L = 1-4) and shows what the network trained with that loss learned. Every position of the
controls is a committed training run (``results/level_sweep.jsonl``), so that a move only
reads rows. One command makes every row, resumable, in two single-thread processes::

    python -m hdn.toy.experiments.level_sweep --shard 0/2 &
    python -m hdn.toy.experiments.level_sweep --shard 1/2

A run whose row is already in the file is skipped; runs go seed by seed, so an interrupted
sweep leaves whole seeds.

**The setting** is attempt 2 of :mod:`hdn.toy.experiments.fine_detail` (notebook 06), where
relief is learnable: shaded near objects with relief at 32 x 32, tilt 0.002, a pool of 4096
scenes per seed, batch 12, Adam at 2e-3 with cosine decay over the run, base 16, one CPU
thread.

**The arms** are the slider's positions: ``ssi`` (L = 1, the same loss for every kind),
``hdn-dr``, ``hdn-dp`` and ``hdn-ds`` at L = 2, 3 and 4, and notebook 06's positive control
``object`` for reference: 11 arms, seeds 0-2.

**The steps, 3000, chosen by the pilots.** In the pilots of ``results/fine_detail_pilot2.jsonl``
the control reached a plane-aligned relief error of 0.585 after 3000 steps and 0.549 after
6000, against 1.000 for SSI after 6000: most of what the control learns, it learns in the first
3000 steps. This sweep's own pilot (``results/level_sweep_pilot.jsonl``: SSI and HDN-DR at
L = 2, seed 0, 6000 steps; the command below with ``--steps 6000 --seeds 0``, stopped after two
runs) separated SSI (0.993) from HDN-DR (0.644), but took 600-700 s a run on this machine's
two shared cores: 33 runs of 6000 steps would need about twice the budget of about 90 minutes
of two cores, 33 runs of 3000 steps fit it. The pilot rows also show how far the 3000-step rows
are from the end of a longer training.

**Each row** is a :func:`hdn.toy.experiments.fine_detail.run` row: the configuration, the
commit at start and a dirty-tree flag, where it ran, the final metrics (plane-aligned relief
error, AbsRel, delta_1), the training curve at 20 steps (``curve``: mean training loss since
the last point, test relief error), the gradient share of the near interiors at 4 steps, and
the float16 predictions of the first four test scenes (``predictions``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from hdn.toy.experiments import fine_detail as _fd

__all__ = [
    "KINDS",
    "LEVELS",
    "RESULTS",
    "SEEDS",
    "SETTING",
    "arm_config",
    "find_row",
    "load_rows",
    "main",
    "plan",
]

#: The context kinds of the slider and its levels (L = 1 is image-level SSI for every kind).
KINDS = ("dr", "dp", "ds")
LEVELS = (1, 2, 3, 4)
SEEDS = (0, 1, 2)

#: The committed rows (package data).
RESULTS = Path(__file__).resolve().parent / "results" / "level_sweep.jsonl"

#: Everything but the arm, the level and the seed (attempt 2's setting at 3000 steps).
SETTING = {"steps": 3000, "pool": 4096, "batch_size": 12, "tilt": 0.002, "base": 16,
           "curve_points": 20, "kept_scenes": 4}  # fmt: skip


def arm_config(kind: str | None, level: int, seed: int, **setting) -> _fd.RunConfig:
    """The run of one slider position: ``kind`` in ``KINDS`` at ``level``; ``kind=None`` is the
    positive control ``object``. L = 1 gives the ``ssi`` arm whatever the kind.

    Examples:
        >>> arm_config("dr", 1, 0).arm, arm_config("dp", 3, 0).arm, arm_config(None, 1, 0).arm
        ('ssi', 'hdn-dp', 'object')
    """
    options = {**SETTING, **setting}
    if kind is None:
        return _fd.RunConfig(arm="object", seed=seed, **options)
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: we expect one of {KINDS} or None. Got: {kind!r}.")
    if level not in LEVELS:
        raise ValueError(f"Invalid level: we expect one of {LEVELS}. Got: {level!r}.")
    if level == 1:
        return _fd.RunConfig(arm="ssi", levels=1, seed=seed, **options)
    return _fd.RunConfig(arm=f"hdn-{kind}", levels=level, seed=seed, **options)


def plan(seeds: Sequence[int] = SEEDS, **setting) -> list[_fd.RunConfig]:
    """Every run of the sweep, seed by seed: SSI, the nine HDN positions, then the control."""
    runs = []
    for seed in seeds:
        runs.append(arm_config("dr", 1, seed, **setting))
        runs += [arm_config(k, level, seed, **setting) for level in LEVELS[1:] for k in KINDS]
        runs.append(arm_config(None, 1, seed, **setting))
    return runs


def load_rows(path: str | Path | None = None) -> list[dict]:
    """The sweep's rows: the committed package data, or the JSONL file at ``path``."""
    if path is None:
        return _fd.load_rows(name="level_sweep.jsonl")
    return _fd.load_rows(path)


def find_row(rows: Sequence[dict], kind: str | None, level: int, seed: int) -> dict | None:
    """The row of a slider position and seed in ``rows`` (None if it has not run)."""
    arm = arm_config(kind, level, seed)
    for row in rows:
        c = row["config"]
        if (c["arm"], c["seed"]) == (arm.arm, seed) and c["levels"] == arm.levels:
            return row
    return None


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the sweep's runs that are not yet in ``--out``; returns the new rows."""
    p = argparse.ArgumentParser(
        prog="python -m hdn.toy.experiments.level_sweep", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=SETTING["steps"])
    p.add_argument("--out", default=str(RESULTS), help="JSONL file the rows are appended to")
    p.add_argument(
        "--shard", default="0/1", help="I/N: run every N-th run of the plan, from the I-th"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    shard, shards = _fd.parse_shard(args.shard)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    new = []
    for i, config in enumerate(plan(args.seeds, steps=args.steps)):
        if i % shards != shard:
            continue
        name = f"{config.arm} L={config.levels} seed {config.seed}"
        if config.key() in {row["key"] for row in load_rows(out)}:
            print(f"skip {name}: already in {out}", flush=True)
            continue
        new.append(_fd.run_and_record(config, out, name))
    return new


if __name__ == "__main__":
    main()
