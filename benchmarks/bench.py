"""Benchmark hdn's losses against the per-context-mask algorithm and the nanmedian SSI.

``python benchmarks/bench.py`` prints, for forward + backward at B=8, 384x384, L=4, float32:

* per scene (:data:`SCENES`), the time of ``hdn`` eager and compiled (``torch.compile``,
  ``fullgraph=True``), of the per-context-mask algorithm (:func:`mask_loss`: one NaN-filled
  copy and one ``nanmedian`` per context, what the released code does) and, for SSI, of the
  straightforward :func:`nanmedian_ssi_loss`; the speed-ups; each loss's time and peak
  memory against ``hdn.ssi_loss``'s;
* the top-level ATen operations and host reads of one eager call (B=2, 64x64), L = 1-6;
* the goals of the engine issue, with their verdicts.

Times come from interleaved rounds in one process per scene, so that a machine whose speed
drifts slows every implementation alike. Peak memory comes from one fresh process per loss
and scene: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak resident set
(``VmHWM``, reset just before the call) above the resident set before it. ``--against DIR``
also times the ``hdn`` package found in ``DIR`` (a worktree of another commit) in alternating
processes. Run it alone on the machine: other load makes the ratios noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

LOSSES = ("ssi", "dr", "dp", "ds")
SCENES = ("ramp", "motorcycle", "lidar", "loguniform", "sky")
HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")
FLOORS = {"dr": 3.0, "dp": 8.0, "ds": 15.0}  # speed-up over the per-context-mask algorithm
MEMORY_X_SSI = 3.0
OPS_PER_LEVEL = 150


# --- inputs -------------------------------------------------------------------------------


def scene_target(scene: str, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A ``(batch, 1, size, size)`` float32 target of a named scene; NaN marks invalid pixels.

    * ``ramp``: a linear depth ramp plus uniform noise (nearly balanced DR bins);
    * ``motorcycle``: crops of the Middlebury 2014 Motorcycle ground truth, with its holes;
    * ``lidar``: LiDAR-like, about 5 % valid pixels in the lower part of the image, 2-80 m;
    * ``loguniform``: depth drawn log-uniformly in 1-100 m (skewed equal-width bins);
    * ``sky``: a road-like scene whose upper 40 % is sky (invalid).
    """
    if scene not in SCENES:
        raise ValueError(f"Invalid scene: we expect one of {SCENES}. Got: {scene!r}.")
    gen = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, size).view(1, size, 1)
    xx = torch.linspace(0, 1, size).view(1, 1, size)
    noise = torch.rand(batch, size, size, generator=gen)
    if scene == "ramp":
        target = 1 + 9 * (yy * 0.7 + xx * 0.3) + 0.5 * noise
        target[:, :4, :4] = float("nan")
    elif scene == "motorcycle":
        target = _motorcycle_crops(batch, size)
    elif scene in ("lidar", "sky"):
        horizon = 0.4  # depth falls from 80 m at the horizon to 2 m at the bottom
        below = ((yy - horizon) / (1 - horizon)).clamp(min=1e-3)
        target = (2 / below).clamp(max=80) * (1 + 0.05 * (xx - 0.5)) + 0.02 * noise
        target = target.expand(batch, size, size).clone()
        if scene == "lidar":
            hit = torch.rand(batch, size, size, generator=gen) < 0.083
            target[~(hit & (yy > horizon).expand_as(hit))] = float("nan")
        else:
            target[:, : int(horizon * size)] = float("nan")
    else:
        target = torch.exp(math.log(100.0) * noise)
    return target.unsqueeze(1).float()


def _motorcycle_crops(batch: int, size: int) -> torch.Tensor:
    from hdn.data import middlebury_motorcycle

    scene = middlebury_motorcycle()
    depth = torch.where(scene.valid, scene.depth, torch.nan)
    H, W = depth.shape
    if min(H, W) < size:
        depth = torch.nn.functional.interpolate(depth[None, None], size=(size, size), mode="nearest")[0, 0]
        H = W = size
    tops = torch.linspace(0, H - size, batch).round().long().tolist()
    lefts = torch.linspace(0, W - size, batch).round().long().tolist()[::-1]
    return torch.stack([depth[t : t + size, s : s + size] for t, s in zip(tops, lefts)])


def make_inputs(scene: str, batch: int, size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A scene's target and a prediction far from it (the cost does not depend on it)."""
    target = scene_target(scene, batch, size)
    pred = 0.5 * target.nan_to_num(1.0) + torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    return pred.to(device), target.to(device)


# --- the baselines ------------------------------------------------------------------------


def nanmedian_ssi_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The straightforward image-level SSI loss with ``torch.nanmedian`` (NaN target: invalid)."""
    B = pred.shape[0]
    valid = target.isfinite().reshape(B, -1)
    count = valid.sum(dim=1, keepdim=True)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(B, -1)
        t = torch.where(valid, x, torch.nan).nanmedian(dim=1, keepdim=True).values.nan_to_num(0.0)
        s = torch.where(valid, (x - t).abs(), 0.0).sum(dim=1, keepdim=True) / (count + 1)
        return (x - t) / (s + 1e-6)

    residual = torch.where(valid, (normalised(pred) - normalised(target.nan_to_num(0.0))).abs(), 0.0)
    return residual.sum() / count.sum().clamp(min=1)


def context_masks(target: torch.Tensor, valid: torch.Tensor, context: str, levels: int):
    """The contexts one at a time as ``(B, P)`` masks, built as the released code builds them:
    DR from each image's depth range, DP from ``torch.nanquantile`` per bin, DS by slicing."""
    B, H, W = target.shape
    g = target.reshape(B, -1)
    v = valid.reshape(B, -1)
    inf = torch.tensor(float("inf"), dtype=g.dtype)
    lo = torch.where(v, g, inf).amin(1, keepdim=True)
    hi = torch.where(v, g, -inf).amax(1, keepdim=True)
    g_nan = torch.where(v, g, torch.nan)
    for level in range(levels):
        w = 1 / 2**level
        for i in range(2**level):
            if context == "dr":
                yield v & (g >= lo + (hi - lo) * (i * w)) & (g < lo + (hi - lo) * ((i + 1) * w) + 1e-30)
            elif context == "dp":
                low = torch.nanquantile(g_nan, i * w, dim=1, keepdim=True)
                high = torch.nanquantile(g_nan, (i + 1) * w, dim=1, keepdim=True)
                yield v & (g >= low) & (g < high)
            else:
                for j in range(2**level):
                    mask = torch.zeros(B, H, W, dtype=torch.bool)
                    mask[:, int(i * w * H) : int((i + 1) * w * H), int(j * w * W) : int((j + 1) * w * W)] = True
                    yield v & mask.reshape(B, -1)


def mask_loss(pred: torch.Tensor, target: torch.Tensor, context: str, levels: int) -> torch.Tensor:
    """The per-context-mask algorithm of the released code: for each context its mask
    (:func:`context_masks`), one NaN-filled copy of the batch, a ``nanmedian`` per image, the
    scale, and the per-pixel sum and count; the per-pixel mean over contexts, over ``N_v``.
    Autograd gives the backward. ``pred``, ``target`` ``(B, 1, H, W)``, NaN target invalid."""
    B = pred.shape[0]
    valid = target.isfinite().reshape(B, -1)
    g = target.nan_to_num(0.0).reshape(B, -1)
    p = pred.reshape(B, -1)
    loss_sum = torch.zeros_like(p)
    count = torch.zeros_like(p)
    for mask in context_masks(g.view(B, *target.shape[-2:]), valid.view(B, *target.shape[-2:]), context, levels):
        n = mask.sum(dim=1, keepdim=True)

        def normalised(x, mask=mask, n=n):
            t = torch.where(mask, x, torch.nan).nanmedian(dim=1, keepdim=True).values.nan_to_num(0.0)
            s = torch.where(mask, (x - t).abs(), 0.0).sum(dim=1, keepdim=True) / (n + 1)
            return (x - t) / (s + 1e-6)

        loss_sum = loss_sum + torch.where(mask, (normalised(p) - normalised(g)).abs(), 0.0)
        count = count + mask
    per_pixel = torch.where(count > 0, loss_sum / count.clamp(min=1), 0.0)
    return per_pixel.sum() / valid.sum().clamp(min=1)


def loss_function(impl: str, loss: str, levels: int):
    """``fn(pred, target)`` of an implementation: ``hdn``, ``compiled``, ``mask``, ``nanmedian``."""
    import hdn

    if impl == "nanmedian":
        return nanmedian_ssi_loss
    if impl == "mask":
        return nanmedian_ssi_loss if loss == "ssi" else lambda p, g: mask_loss(p, g, loss, levels)
    if loss == "ssi":
        fn = hdn.ssi_loss
    else:
        def fn(p, g):
            return hdn.hdn_loss(p, g, context=loss, levels=levels)
    if impl == "compiled":
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=os.environ.get("HDN_BENCH_BACKEND", "inductor"))
    return fn


# --- workers (one process each) -----------------------------------------------------------


def _step(fn, pred0, target) -> None:
    pred = pred0.clone().requires_grad_(True)
    fn(pred, target).backward()
    if pred.is_cuda:
        torch.cuda.synchronize()


def _time_worker(cfg) -> dict:
    """Medians over interleaved rounds, ms: ``{loss: {impl: ms}}``."""
    impls = cfg.impls
    out: dict = {}
    if cfg.scene not in cfg.compiled_scenes:  # (compiling takes minutes on a CPU)
        impls = [impl for impl in impls if impl != "compiled"]
    for loss in LOSSES:
        pred, target = make_inputs(cfg.scene, cfg.batch, cfg.size, cfg.device)
        fns = {impl: loss_function(impl, loss, cfg.levels) for impl in impls}
        if loss == "ssi":
            fns.pop("mask", None)
            fns["nanmedian"] = loss_function("nanmedian", loss, cfg.levels)
        for fn in fns.values():  # (compiles, lazy initialisation)
            _step(fn, pred, target)
        samples: dict[str, list[float]] = {impl: [] for impl in fns}
        for _ in range(cfg.rounds):
            for impl, fn in fns.items():
                repeats = 1 if impl == "mask" else cfg.repeats
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    _step(fn, pred, target)
                    samples[impl].append(time.perf_counter() - t0)
        out[loss] = {impl: 1e3 * statistics.median(s) for impl, s in samples.items()}
    return out


def _memory_worker(cfg) -> dict:
    """Peak memory (MiB) of one forward + backward of ``cfg.loss`` by ``hdn``."""
    fn = loss_function("hdn", cfg.loss, cfg.levels)
    pred, target = make_inputs(cfg.scene, cfg.batch, cfg.size, cfg.device)
    small = [t[:1, :, :16, :16].clone() for t in (pred, target)]
    _step(fn, *small)  # (code paged in and caches made before the baseline)
    _step(fn, pred, target)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, pred, target)
        return {"peak": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident set
        f.write("5")
    _step(fn, pred, target)
    return {"peak": max(_status_kib("VmHWM") - base, 0) / 1024}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def count_ops(fn) -> tuple[int, int]:
    """Top-level ATen operations and host reads (:data:`HOST_READS`) of ``fn()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    reads = sum(1 for e in prof.events() if e.name in HOST_READS)
    return len(top), reads


def _counts_worker(cfg) -> dict:
    """``{loss: {levels: [ops, host reads]}}`` for one eager forward + backward, B=2, 64x64,
    on the device path (the CPU branches that read the host switched off, as on a GPU)."""
    from hdn._core import engine

    engine.reads_host = lambda x: False
    out: dict = {}
    for loss in LOSSES:
        out[loss] = {}
        for levels in (1,) if loss == "ssi" else range(1, 7):
            fn = loss_function("hdn", loss, levels)
            pred, target = make_inputs("loguniform", 2, 64, cfg.device)
            _step(fn, pred, target)
            out[loss][levels] = count_ops(lambda fn=fn, pred=pred, target=target: _step(fn, pred, target))
    return out


def _run(cfg, what: str, env_path: str | None = None, **extra) -> dict:
    args = [sys.executable, __file__, "--worker", what, "--device", cfg.device, "--batch", str(cfg.batch),
            "--size", str(cfg.size), "--levels", str(cfg.levels), "--threads", str(cfg.threads),
            "--rounds", str(cfg.rounds), "--repeats", str(cfg.repeats), "--impls", *cfg.impls,
            "--compiled-scenes", *cfg.compiled_scenes]
    for key, value in extra.items():
        args += [f"--{key}", str(value)]
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = env_path
    if what == "memory":  # large blocks from mmap: freed memory leaves the resident set, whose
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # peak then tracks live tensors (times elsewhere)
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the report ---------------------------------------------------------------------------


def goal_rows(times: dict, memory: dict, counts: dict) -> list[tuple[str, str, bool]]:
    """``(goal, figure, met)`` per goal and scene: ``times[scene][loss][impl]`` (ms),
    ``memory[scene][loss]`` (MiB), ``counts[loss][levels] = (ops, reads)``."""
    rows = []
    for scene, table in times.items():
        ssi = table["ssi"]
        rows.append((f"{scene}: SSI no slower than nanmedian", f"{ssi['nanmedian'] / ssi['hdn']:.2f}x", ssi["hdn"] <= ssi["nanmedian"]))
        for loss, floor in FLOORS.items():
            if "mask" in table[loss]:
                ratio = table[loss]["mask"] / table[loss]["hdn"]
                rows.append((f"{scene}: {loss.upper()} >= {floor:g}x the mask algorithm", f"{ratio:.1f}x", ratio >= floor))
        if scene in memory:
            worst = max(memory[scene][loss] / max(memory[scene]["ssi"], 1e-9) for loss in FLOORS)
            rows.append((f"{scene}: peak memory <= {MEMORY_X_SSI:g}x SSI's", f"{worst:.2f}x", worst <= MEMORY_X_SSI))
    for loss, by_level in counts.items():
        worst = max(ops / int(levels) for levels, (ops, _) in by_level.items())
        reads = max(r for _, r in by_level.values())
        rows.append((f"{loss}: <= {OPS_PER_LEVEL} top-level ops per level", f"{worst:.0f}", worst <= OPS_PER_LEVEL))
        rows.append((f"{loss}: no host reads", f"{reads}", reads == 0))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole report")
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--impls", nargs="+", default=["hdn", "compiled", "mask"])
    parser.add_argument("--compiled-scenes", nargs="+", default=["motorcycle"], choices=SCENES,
                        help="the scenes timed compiled too (inductor compiles for minutes on a CPU)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--against", help="a directory holding another hdn (a git worktree): timed too")
    parser.add_argument("--worker", choices=("time", "memory", "counts"))
    parser.add_argument("--scene", default="ramp")
    parser.add_argument("--loss", default="ssi")
    cfg = parser.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    if cfg.worker:
        worker = {"time": _time_worker, "memory": _memory_worker, "counts": _counts_worker}[cfg.worker]
        print(json.dumps(worker(cfg)))
        return
    print(f"{cfg.device}, B={cfg.batch}, {cfg.size}x{cfg.size}, L={cfg.levels}, float32, forward + backward, "
          f"{cfg.threads} thread(s); ms are medians of {cfg.rounds} interleaved rounds")
    for run in range(cfg.runs):
        times, memory = {}, {}
        for scene in cfg.scenes:
            times[scene] = _run(cfg, "time", scene=scene)
            if not cfg.no_memory:
                memory[scene] = {loss: _run(cfg, "memory", scene=scene, loss=loss)["peak"] for loss in LOSSES}
            _print_scene(scene, times[scene], memory.get(scene), cfg)
            if cfg.against:
                _print_against(scene, cfg)
        counts = _run(cfg, "counts")
        print("\n== top-level ATen operations / host reads per eager forward + backward, B=2, 64x64 ==")
        print("levels  " + "".join(f"{levels:>12}" for levels in range(1, 7)))
        for loss, by_level in counts.items():
            print(f"{loss:<8}" + "".join(f"{ops:>8} / {reads:<1}" for ops, reads in by_level.values()))
        rows = goal_rows(times, memory, counts)
        print(f"\n== goals, run {run + 1}: {sum(met for *_, met in rows)} of {len(rows)} met ==")
        for goal, figure, met in rows:
            print(f"{'met ' if met else 'MISS'}  {goal:<52} {figure:>9}")


def _print_scene(scene: str, table: dict, memory: dict | None, cfg) -> None:
    print(f"\n== scene {scene!r} ==")
    print(f"{'loss':<6}{'hdn ms':>10}{'compiled':>10}{'mask ms':>10}{'speed-up':>10}{'x SSI':>8}{'MiB':>8}{'mem x SSI':>10}")
    for loss, row in table.items():
        base = row.get("mask", row.get("nanmedian")) or float("nan")  # (none without --impls mask)
        speedup = base / row["hdn"]
        mib = memory[loss] if memory else float("nan")
        mem_x = mib / memory["ssi"] if memory and memory["ssi"] > 0 else float("nan")
        print(f"{loss:<6}{row['hdn']:>10.1f}{row.get('compiled', float('nan')):>10.1f}{base:>10.1f}"
              f"{speedup:>10.2f}{row['hdn'] / table['ssi']['hdn']:>8.2f}{mib:>8.1f}{mem_x:>10.2f}")
    print("(SSI's baseline is the nanmedian version)")


def _print_against(scene: str, cfg) -> None:
    """hdn here against the hdn in ``cfg.against``, alternating processes, eager only."""
    ratios: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    quick = argparse.Namespace(**{**vars(cfg), "impls": ["hdn"], "rounds": 1})
    for _ in range(cfg.rounds):
        here = _run(quick, "time", scene=scene)
        there = _run(quick, "time", env_path=str(Path(cfg.against).resolve()), scene=scene)
        for loss in LOSSES:
            ratios[loss].append(here[loss]["hdn"] / there[loss]["hdn"])
    print("this hdn / the other (eager, alternating processes): "
          + ", ".join(f"{loss} {statistics.median(r):.2f}" for loss, r in ratios.items()))


if __name__ == "__main__":
    main()
