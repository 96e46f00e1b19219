"""When does HDN keep fine detail? A pre-registered dose-response over the depth gap (notebook 06).

Notebook 06's experiment showed HDN keeping the near objects' relief where SSI lost it, in
scenes built in HDN's favour: the objects stand 1.5-3 m away in front of a background 20-60 m
away, with nothing in between, so that DR's nearest bin and the DS cells around an object
almost reproduce the object control. This experiment asks whether the advantage holds as the
gap closes. One command makes every row (``results/gap_dose.jsonl``), resumable, in two
single-thread processes::

    python -m hdn.toy.experiments.gap_dose --shard 0/2 &
    python -m hdn.toy.experiments.gap_dose --shard 1/2

**Pre-registration** (committed before any run of this experiment; notebook 06 repeats it).

- **Settings (the dose)**, :data:`hdn.toy.relief.BACKGROUNDS`; everything else as notebook 06's
  attempt 2 (shaded objects with relief at 32 x 32, tilt 0.002, a pool of 4096 scenes per
  seed, batch 12, Adam at 2e-3 with cosine decay, base 16, L = 3 for every HDN arm):

  - ``far``: the background 20-60 m away (attempt 2's scenes; gap rank 3);
  - ``mid``: 8-15 m (rank 2);
  - ``close``: 3-6 m, just behind the objects (rank 1);
  - ``ground``: no gap. The objects stand on a textured ground plane whose depth runs from
    about 1 m at the bottom of the image, in front of them, to 25-40 m at the top, far behind
    them; beside each object the ground has the object's depth (rank 0).

  A seed draws the same objects in every setting (on ``ground`` moved down to stand on it).
- **Arms**: ``ssi``, ``hdn-dr``, ``hdn-ds``, ``hdn-dp`` and the object control ``object`` in
  every setting, and in ``ground`` also ``ssi`` trained on disparity labels
  (``disparity_fraction = 1``), the baseline a practitioner would use.
- **Seeds** 0-4 per arm and setting; a seed fixes the initialisation, the training pool and
  the batch order, so arms are paired by seed within a setting.
- **Steps: 3000**, the same as notebook 05's slider sweep (:mod:`level_sweep`), chosen from
  the pilots: the object control reached 0.585 after 3000 steps and 0.549 after 6000 in
  ``results/fine_detail_pilot2.jsonl`` (SSI 1.000), so most of what is learned is learned by
  3000 steps; and on this two-core machine a 3000-step run takes about 250 s of one core, so
  the 105 runs take about 3.6 hours of two cores, the budget of about four hours. 6000 steps
  would need twice that.
- **Primary metric**: :func:`hdn.metrics.relief_error` with ``align="plane"`` (sigma 2 px,
  erosion 2 px) on the 128 fixed test scenes ``(999, i)`` of the same setting: 0 = the near
  relief exact, 1 = flat. Secondary: AbsRel and delta_1 (least-squares alignment in depth; in
  inverse depth for the disparity arm).
- **Positive control first.** The ``object`` runs of every setting run before any comparison
  arm. The gate, fixed for 3000 steps from the pilot above: the control's primary metric is
  below 0.75 in every seed of the setting. A setting whose control fails cannot answer the
  question; it is reported as such and not compared.
- **Decision rule per setting**, as notebook 06: for each HDN arm X, the per-seed paired
  difference ``relief(X) - relief(ssi)``; "X keeps finer near detail than SSI" if the mean over
  the 5 seeds is < 0 and its 95 % t-interval excludes 0, "X loses near detail" if > 0 with an
  interval that excludes 0, otherwise "no difference shown". In ``ground`` the same rule is
  also applied to ``relief(X) - relief(ssi on disparity labels)``. A bootstrap interval over
  the test scenes is reported beside it; it does not decide.
- **Decision rule for the trend.** For each HDN arm X and each seed, the least-squares slope of
  the paired difference ``relief(X) - relief(ssi)`` against the gap rank (3 far ... 0 ground),
  over the settings whose control passed. "HDN's advantage shrinks as the gap closes" if the
  mean of the 5 per-seed slopes is < 0 and its 95 % t-interval excludes 0 (the difference is
  most negative where the gap is largest); "it grows" if > 0 with an interval that excludes 0;
  otherwise "no trend shown".
- **Run order**: the controls of all settings seed by seed, then every comparison run seed by
  seed (within a seed: every setting, every arm), then the disparity arm; an interrupted run
  leaves whole seeds.

Each row is a :func:`hdn.toy.experiments.fine_detail.run` row (configuration with its
``background``, the commit at start with a dirty-tree flag, where it ran, the metrics, the
per-scene errors, gradient shares).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hdn.toy.experiments import fine_detail as _fd
from hdn.toy.relief import BACKGROUNDS

__all__ = [
    "ARMS",
    "CONTROL_GATE",
    "DISPARITY_ARM",
    "GAP_RANK",
    "RESULTS",
    "SEEDS",
    "SETTING",
    "control_passes",
    "differences",
    "dose_response",
    "load_rows",
    "main",
    "plan",
    "progress",
    "setting_rows",
    "trend",
    "trend_reading",
]

#: The comparison arms in every setting (the control ``object`` runs first, see ``plan``).
ARMS = ("ssi", "hdn-dr", "hdn-ds", "hdn-dp")
SEEDS = (0, 1, 2, 3, 4)
#: Gap rank of each background: 3 isolated in depth ... 0 no gap.
GAP_RANK = {"far": 3, "mid": 2, "close": 1, "ground": 0}
#: The name under which the analysis shows ``ssi`` trained on disparity labels (in ``ground``).
DISPARITY_ARM = "ssi-disparity"
#: The primary metric (plane-aligned relief error) and its per-scene field.
METRIC, PER_SCENE = "relief_error_plane", "relief_plane_per_scene"
#: The control's primary metric must be below this in every seed of a setting.
CONTROL_GATE = 0.75

#: The dose-response's rows, one per run (package data; absent until the experiment has run).
RESULTS = Path(__file__).resolve().parent / "results" / "gap_dose.jsonl"

#: Everything but the arm, the seed, the background and the labels' space.
SETTING = {"steps": 3000, "pool": 4096, "batch_size": 12, "tilt": 0.002, "base": 16, "levels": 3}


def plan(seeds: Sequence[int] = SEEDS, **setting) -> list[_fd.RunConfig]:
    """Every run in the pre-registered order: controls, comparisons, the disparity arm."""
    options = {**SETTING, **setting}
    runs = [_fd.RunConfig(arm="object", seed=s, background=b, **options)
            for s in seeds for b in BACKGROUNDS]  # fmt: skip
    runs += [_fd.RunConfig(arm=a, seed=s, background=b, **options)
             for s in seeds for b in BACKGROUNDS for a in ARMS]  # fmt: skip
    runs += [_fd.RunConfig(arm="ssi", seed=s, background="ground", disparity_fraction=1.0, **options)
             for s in seeds]  # fmt: skip
    return runs


def load_rows(path: str | Path | None = None) -> list[dict]:
    """The experiment's rows: the committed package data, or the JSONL file at ``path``."""
    if path is None:
        return _fd.load_rows(name="gap_dose.jsonl") if RESULTS.exists() else []
    return _fd.load_rows(path)


def _setting_rows(rows: Sequence[dict], background: str, disparity: float = 0.0) -> list[dict]:
    return _fd.select_rows(rows, background=background, disparity_fraction=disparity)


def control_passes(
    rows: Sequence[dict], background: str, seeds: Sequence[int] = SEEDS
) -> bool | None:
    """Whether the control passed its gate in ``background`` (None until every seed has run)."""
    control = [r for r in _setting_rows(rows, background) if r["config"]["arm"] == "object"]
    if not set(seeds) <= {r["config"]["seed"] for r in control}:
        return None
    control = [r for r in control if r["config"]["seed"] in set(seeds)]
    return all(r["metrics"][METRIC] < CONTROL_GATE for r in control)


def trend(rows: Sequence[dict], arm: str) -> tuple[float, float, float]:
    """The pre-registered trend of ``arm``: per seed, the least-squares slope of the paired
    difference ``relief(arm) - relief(ssi)`` against the gap rank over the settings whose control
    passed; returns the mean slope and its 95 % t-interval.

    Examples:
        >>> rows = [{"config": {"arm": a, "seed": s, "background": b},
        ...          "metrics": {"relief_error_plane": v}}
        ...         for s in SEEDS for b in GAP_RANK
        ...         for a, v in (("object", 0.5), ("ssi", 1.0),
        ...                      ("hdn-dr", 1.0 - 0.1 * GAP_RANK[b] + 0.01 * s))]
        >>> [round(x, 3) for x in trend(rows, "hdn-dr")]
        [-0.1, -0.1, -0.1]
    """
    settings = [b for b in BACKGROUNDS if control_passes(rows, b)]
    if len(settings) < 2:
        raise ValueError(
            f"Invalid rows: we expect a passed control in at least two settings. Got: {settings}."
        )
    ranks = np.array([GAP_RANK[b] for b in settings], dtype=np.float64)
    slopes = []
    for seed in SEEDS:
        diffs = []
        for b in settings:
            d = _fd.paired_differences(_setting_rows(rows, b), arm, metric=METRIC)
            if seed not in d:
                break
            diffs.append(d[seed])
        else:
            slopes.append(float(np.polyfit(ranks, np.array(diffs), 1)[0]))
    return _fd.paired_t_interval(slopes)


def trend_reading(low: float, high: float) -> str:
    """The pre-registered reading of the trend's 95 % interval (slope per gap rank).

    Examples:
        >>> trend_reading(-0.2, -0.1), trend_reading(-0.1, 0.1), trend_reading(0.1, 0.2)
        ('shrinks as the gap closes', 'no trend shown', 'grows as the gap closes')
    """
    if high < 0:
        return "shrinks as the gap closes"
    if low > 0:
        return "grows as the gap closes"
    return "no trend shown"


def setting_rows(rows: Sequence[dict], background: str) -> list[dict]:
    """The rows of one setting, every arm under its own name: the disparity-label ``ssi`` runs
    of ``ground`` become :data:`DISPARITY_ARM`, so that every arm pairs with every other by seed."""
    out = list(_setting_rows(rows, background))
    for r in _setting_rows(rows, background, disparity=1.0):
        out.append({**r, "config": {**r["config"], "arm": DISPARITY_ARM}})
    return out


def progress(rows: Sequence[dict]) -> tuple[int, int]:
    """How many of the pre-registered runs (:func:`plan`) ``rows`` hold, and how many there are."""
    planned = {c.key() for c in plan()}
    return len(planned & {r["key"] for r in rows}), len(planned)


def dose_response(rows: Sequence[dict]) -> list[dict]:
    """Per setting and arm with at least two seeds: the primary metric's mean over the seeds and
    its 95 % t-interval (``background``, ``rank``, ``arm``, ``seeds``, ``mean``, ``low``,
    ``high``), in the order of the settings (far ... ground) and of the arms (control first)."""
    out = []
    for background in BACKGROUNDS:
        by_arm: dict[str, list[float]] = {}
        for r in setting_rows(rows, background):
            by_arm.setdefault(r["config"]["arm"], []).append(r["metrics"][METRIC])
        for arm in ("object", *ARMS, DISPARITY_ARM):
            values = by_arm.get(arm, [])
            if len(values) >= 2:
                mean, low, high = _fd.paired_t_interval(values)
                out.append({"background": background, "rank": GAP_RANK[background], "arm": arm,
                            "seeds": len(values), "mean": mean, "low": low, "high": high})  # fmt: skip
    return out


def differences(rows: Sequence[dict]) -> list[dict]:
    """The pre-registered comparisons: per setting whose control passed, per HDN arm ``X`` and
    baseline (``ssi``; in ``ground`` also :data:`DISPARITY_ARM`) with at least two paired seeds,
    the paired difference ``relief(X) - relief(baseline)``: its mean over the seeds, 95 %
    t-interval and verdict (:func:`hdn.toy.experiments.fine_detail.verdict`), and the bootstrap
    interval over the test scenes beside it (``boot_low``, ``boot_high``; it does not decide).

    Examples:
        >>> rows = [{"config": {"arm": a, "seed": s, "background": b},
        ...          "metrics": {"relief_error_plane": v}, "relief_plane_per_scene": [v, v]}
        ...         for s in SEEDS for b in GAP_RANK
        ...         for a, v in (("object", 0.5), ("ssi", 1.0), ("hdn-dr", 0.8 + 0.01 * s))]
        >>> d = differences(rows)[0]
        >>> d["background"], d["arm"], d["seeds"], round(d["mean"], 3), d["verdict"]
        ('far', 'hdn-dr', 5, -0.18, 'keeps finer near detail')
    """
    out = []
    for background in BACKGROUNDS:
        if not control_passes(rows, background):
            continue
        here = setting_rows(rows, background)
        baselines = ("ssi", DISPARITY_ARM) if background == "ground" else ("ssi",)
        for baseline in baselines:
            for arm in ARMS[1:]:
                paired = _fd.paired_differences(here, arm, baseline, metric=METRIC)
                if len(paired) < 2:
                    continue
                mean, low, high = _fd.paired_t_interval(list(paired.values()))
                scenes = _fd.scene_differences(here, arm, baseline, field=PER_SCENE)
                _, boot_low, boot_high = _fd.bootstrap_interval(scenes)
                out.append({"background": background, "rank": GAP_RANK[background], "arm": arm,
                            "baseline": baseline, "seeds": len(paired), "mean": mean, "low": low,
                            "high": high, "verdict": _fd.verdict(low, high),
                            "boot_low": boot_low, "boot_high": boot_high})  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the dose-response's runs, controls first, that ``--out`` lacks; returns the new rows."""
    p = argparse.ArgumentParser(
        prog="python -m hdn.toy.experiments.gap_dose", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--steps", type=int, default=SETTING["steps"])
    p.add_argument("--controls-only", action="store_true", help="run the controls only")
    p.add_argument("--out", default=str(RESULTS), help="JSONL file the rows are appended to")
    p.add_argument("--shard", default="0/1", help="I/N: every N-th run of the plan, from the I-th")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    shard, shards = _fd.parse_shard(args.shard)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = plan(args.seeds, steps=args.steps)
    if args.controls_only:
        runs = [c for c in runs if c.arm == "object"]
    new = []
    for i, config in enumerate(runs):
        if i % shards != shard:
            continue
        name = f"{config.background} {config.arm} disp {config.disparity_fraction} seed {config.seed}"
        done = load_rows(out)
        if config.key() in {row["key"] for row in done}:
            print(f"skip {name}: already in {out}", flush=True)
            continue
        if config.arm != "object":
            passed = control_passes(done, config.background, args.seeds)
            while passed is None and shards > 1 and not args.controls_only:
                time.sleep(30)  # the other shard still runs a control: controls come first
                passed = control_passes(load_rows(out), config.background, args.seeds)
            if passed is False:
                print(f"skip {name}: the control failed its gate in {config.background}", flush=True)
                continue
        new.append(_fd.run_and_record(config, out, name))
    return new


if __name__ == "__main__":
    main()
