"""Benchmark: time and peak memory of hdn's losses against the slow reference, on real scenes.

``python -m hdn.bench`` prints, for forward + backward at B=8, 384x384, L=4, float32, one
table per *scene* (:data:`SCENES`): time and peak memory of ``hdn`` and of
:mod:`hdn.reference` (one mask per context, the released code's algorithm) for SSI, DR, DP
and DS, their ratios, each loss's cost and memory relative to :func:`hdn.ssi_loss`, the time
of the torch kernels that CUDA runs (``torch.kthvalue`` selections and gathers instead of
NumPy's introselect and repeats; timed here on the CPU) against the CPU's NumPy kernels, and, for SSI, the straightforward ``torch.nanmedian`` version. The scenes:

* ``ramp``: a linear depth ramp plus uniform noise (nearly balanced DR bins);
* ``motorcycle``: 8 crops of the Middlebury 2014 Motorcycle ground truth (:mod:`hdn.data`),
  dense and real, with its own holes;
* ``lidar``: a LiDAR-like sparse target, about 5 % valid pixels in the lower part of the
  image, 2-80 m;
* ``loguniform``: depth drawn log-uniformly in 1-100 m (skewed equal-width bins);
* ``sky``: a road-like scene whose upper 40 % is sky (invalid).

After the scene tables, a goals table says, per scene, whether each of :data:`GOALS` is
met; ``--runs N`` repeats tables and goals ``N`` times. ``--scaling`` adds time against pixel count (128^2 to 1024^2), levels (1-6) and batch size,
as ms per million pixel-levels (constant when the cost is linear in pixels x levels), and
``--counts`` the host synchronisations (``aten::_local_scalar_dense``, ``aten::item``) and
ATen operations per call of the torch path, by levels. It then checks what the released code
cannot do (DP on one 4100x4100 image, half precision), and repeats the tables on CUDA when a
GPU is present.

Times: one fresh subprocess per loss runs ``hdn``, the reference and (for the HDN losses)
``hdn.ssi_loss`` in interleaved rounds, so that a machine whose speed drifts from minute
to minute (shared or throttled cores) slows all of them alike and the ratios stay
meaningful. Each round re-warms an implementation (two untimed calls) before timing
``--repeats`` calls of it, as in a training loop, then times one reference call; the
table gives medians over ``--rounds`` rounds. Peak memory: one fresh subprocess per
implementation and loss, so that the peak is its own: on CPU the peak resident set size
(``VmHWM``, reset just before the call) above the baseline taken after the inputs were
built and one 16x16 call had paged in the code; on CUDA ``torch.cuda.max_memory_allocated``
above the inputs. Use ``--quick`` for a smaller configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = ("ssi", "dr", "dp", "ds")
SCENES = ("ramp", "motorcycle", "lidar", "loguniform", "sky")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (``VmHWM``) to its current one (Linux
    4.0+); False where that is not possible.

    Without the reset, the peak is the process's lifetime peak, which is never below the
    parent's resident set at the fork that started it (the kernel keeps the forked copy's
    peak across ``exec``): the benchmark's own memory, growing scene by scene, became
    every loss's "peak" (the same 56-70 MiB for every loss on the later scenes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss_bytes() is not None
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    """``VmHWM`` of this process, in bytes (None where ``/proc`` does not give it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def scene_target(scene: str, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """A ``(batch, 1, size, size)`` float32 target of a named scene; NaN marks invalid pixels.

    Examples:
        >>> g = scene_target("lidar", 2, 64)
        >>> g.shape, 0.02 < float(g.isfinite().float().mean()) < 0.08
        (torch.Size([2, 1, 64, 64]), True)
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
        # a road seen from a car: depth falls from 80 m at the horizon to 2 m at the bottom
        horizon = 0.4
        below = ((yy - horizon) / (1 - horizon)).clamp(min=1e-3)
        target = (2 / below).clamp(max=80) * (1 + 0.05 * (xx - 0.5)) + 0.02 * noise
        target = target.expand(batch, size, size).clone()
        if scene == "lidar":
            # about 5 % valid in all: an eighth of the pixels below the horizon, none above
            hit = torch.rand(batch, size, size, generator=gen) < 0.083
            target[~(hit & (yy > horizon).expand_as(hit))] = float("nan")
        else:
            target[:, : int(horizon * size)] = float("nan")
    else:  # loguniform
        target = torch.exp(math.log(1.0) + (math.log(100.0) - math.log(1.0)) * noise)
    return target.unsqueeze(1).float()


def _motorcycle_crops(batch: int, size: int) -> torch.Tensor:
    """``batch`` crops of ``size x size`` of the Motorcycle depth (resized if it is smaller)."""
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


def _make_inputs(batch: int, size: int, device: str, dtype: torch.dtype, seed: int = 0, scene: str = "ramp"):
    gen = torch.Generator().manual_seed(seed + 1)
    target = scene_target(scene, batch, size, seed)
    # a prediction of the right layout, far from exact (the losses' cost does not depend on it)
    pred = 0.5 * target.nan_to_num(1.0) + torch.rand(target.shape, generator=gen)
    return pred.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


def nanmedian_ssi_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The straightforward image-level SSI loss with ``torch.nanmedian`` (NaN target = invalid).

    What a user writes first, and what the released code does: per image, median and mean
    absolute deviation (over ``n + 1``) of prediction and target over the valid pixels.

    Examples:
        >>> g = torch.rand(2, 1, 8, 8) + 1
        >>> import hdn
        >>> bool(torch.isclose(nanmedian_ssi_loss(0.5 * g, g), hdn.ssi_loss(0.5 * g, g), atol=1e-6))
        True
    """
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


def _loss_fn(impl: str, case: str, levels: int):
    if impl in ("hdn", "torchpath"):
        import hdn

        fn = (lambda p, g: hdn.ssi_loss(p, g)) if case == "ssi" else (
            lambda p, g: hdn.hdn_loss(p, g, context=case, levels=levels))
        if impl == "hdn":
            return fn
        return _on_torch_path(fn)
    if impl == "nanmedian":
        return nanmedian_ssi_loss
    from hdn import reference

    if case == "ssi":
        return lambda p, g: reference.ssi_loss(p[:, 0], g[:, 0])
    return lambda p, g: reference.hdn_loss(p[:, 0], g[:, 0], context=case, levels=levels)


def _on_torch_path(fn):
    """``fn`` with the run core's kernels in torch (``torch.kthvalue`` selections and
    ``torch.segment_reduce`` sums, what CUDA runs) instead of NumPy, so that the GPU's
    algorithm is timed on the CPU too."""
    from hdn._core import runs

    def torch_path(p, g):
        saved, runs._NUMPY = runs._NUMPY, False
        try:
            return fn(p, g)
        finally:
            runs._NUMPY = saved

    return torch_path


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype)
    pred0, target = _make_inputs(args.batch, args.size, device, dtype, scene=args.scene)
    import hdn  # noqa: F401  (imported outside the measured steps, as the reference is)

    def step(fn) -> None:
        pred = pred0.clone().requires_grad_(True)
        fn(pred, target).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if args.what == "memory":
        fn = _loss_fn(args.impl, args.case, args.levels)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(fn)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            # One small call first, so that code and libraries paged in on first use are in
            # the baseline and the peak counts the call's data only.
            small = [t[:1, :, :16, :16].clone() for t in (pred0, target)]
            fn(small[0].requires_grad_(True), small[1]).backward()
            del small
            base = _rss_bytes()
            reset = _reset_peak_rss()
            step(fn)
            # (without the reset, the lifetime peak: an upper bound, see _reset_peak_rss)
            top = _peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak = top - base
        print(json.dumps({"peak": max(peak, 0)}))
        return
    if args.what == "scaling":
        _scaling_worker(args, step)
        return
    if args.what == "counts":
        _counts_worker(args)
        return
    # Interleaved rounds: hdn (and ssi_loss, the torch path, nanmedian) re-warmed and timed
    # ``repeats`` times, then one reference call, so that drift in the machine's speed
    # reaches every ratio alike.
    fns = {"hdn": _loss_fn("hdn", args.case, args.levels), "ref": _loss_fn("reference", args.case, args.levels)}
    if args.case != "ssi":
        fns["ssi"] = _loss_fn("hdn", "ssi", args.levels)
    else:
        fns["nanmedian"] = _loss_fn("nanmedian", "ssi", args.levels)
    if device == "cpu":
        fns["torchpath"] = _loss_fn("torchpath", args.case, args.levels)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    step(fns["ref"])  # the first call of each pays for lazy initialisation
    for _ in range(args.rounds):
        for name, fn in fns.items():
            timed = 1 if name == "ref" else args.repeats
            for _ in range(0 if name == "ref" else 2):
                step(fn)
            for _ in range(timed):
                t0 = time.perf_counter()
                step(fn)
                samples[name].append(time.perf_counter() - t0)
    print(json.dumps({name: statistics.median(times) for name, times in samples.items()}))


def _run_worker(impl: str, case: str, cfg: argparse.Namespace, what: str) -> dict:
    cmd = [
        sys.executable, "-m", "hdn.bench", "--worker", "--impl", impl, "--case", case,
        "--batch", str(cfg.batch), "--size", str(cfg.size), "--levels", str(cfg.levels),
        "--device", cfg.device, "--dtype", cfg.dtype, "--threads", str(cfg.threads),
        "--repeats", str(cfg.repeats), "--rounds", str(cfg.rounds), "--what", what,
        "--scene", getattr(cfg, "scene", "ramp"),
        "--scaling-sizes", *map(str, cfg.scaling_sizes),
    ]
    env = dict(os.environ)
    if what == "memory":
        # Large blocks straight from mmap, so that freed memory leaves the resident set and
        # the peak RSS tracks live tensors (glibc otherwise keeps freed blocks). It slows
        # allocation, so times are taken in another process without it.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(cfg: argparse.Namespace) -> dict:
    print(
        f"\n== {cfg.device}, scene {cfg.scene!r}: B={cfg.batch}, {cfg.size}x{cfg.size}, L={cfg.levels}, "
        f"{cfg.dtype}, forward+backward, {cfg.threads} thread(s); times: medians of {cfg.rounds} "
        f"interleaved rounds ({cfg.repeats} hdn calls and 1 reference call each) =="
    )
    _, target = _make_inputs(cfg.batch, cfg.size, "cpu", torch.float32, scene=cfg.scene)
    print(f"valid pixels {float(target.isfinite().float().mean()):.1%}")
    results = {}
    for case in CASES:
        times = _run_worker("hdn", case, cfg, "time")
        results[case] = {
            "hdn": {"time": times["hdn"], **_run_worker("hdn", case, cfg, "memory")},
            "ref": {"time": times["ref"], **_run_worker("reference", case, cfg, "memory")},
            "ssi_time": times.get("ssi", times["hdn"]),
            "torchpath_time": times.get("torchpath"),
            "nanmedian_time": times.get("nanmedian"),
        }
    ssi_peak = max(results["ssi"]["hdn"]["peak"], 1)
    header = (f"{'loss':<5} {'hdn ms':>8} {'ref ms':>9} {'speed-up':>8} {'hdn MiB':>8} {'ref MiB':>8} "
              f"{'mem ratio':>9} {'x ssi':>6} {'mem x ssi':>9} {'torch ms':>9} {'torch/cpu':>9}")
    print(header)
    for case in CASES:
        r = results[case]
        h, ref = r["hdn"], r["ref"]
        r["speedup"] = ref["time"] / h["time"]
        r["mem_ratio"] = ref["peak"] / max(h["peak"], 1)
        r["x_ssi"] = h["time"] / r["ssi_time"]
        r["mem_x_ssi"] = h["peak"] / ssi_peak
        torch_ms = r["torchpath_time"]
        r["torch_over_cpu"] = torch_ms / h["time"] if torch_ms else float("nan")
        print(
            f"{case:<5} {h['time'] * 1e3:8.2f} {ref['time'] * 1e3:9.2f} {r['speedup']:8.1f} "
            f"{h['peak'] / 2**20:8.1f} {ref['peak'] / 2**20:8.1f} {r['mem_ratio']:9.1f} "
            f"{r['x_ssi']:6.2f} {r['mem_x_ssi']:9.2f} "
            f"{(torch_ms or float('nan')) * 1e3:9.2f} {r['torch_over_cpu']:9.2f}"
        )
    nm = results["ssi"]["nanmedian_time"]
    if nm:
        results["ssi"]["over_nanmedian"] = nm / results["ssi"]["hdn"]["time"]
        print(f"hdn.ssi_loss against the torch.nanmedian version ({nm * 1e3:.1f} ms): "
              f"{results['ssi']['over_nanmedian']:.2f}x faster")
    print("(x ssi, mem x ssi: time and peak memory over hdn.ssi_loss's; torch ms: the torch "
          "kernels that CUDA runs, timed on this device)")
    return results


GOALS = (
    ("ssi_loss >= 1.5x the nanmedian version", lambda r: r["ssi"]["over_nanmedian"], ">=", 1.5),
    ("DR >= 10x the reference", lambda r: r["dr"]["speedup"], ">=", 10.0),
    ("DP >= 20x the reference", lambda r: r["dp"]["speedup"], ">=", 20.0),
    ("DS >= 50x the reference", lambda r: r["ds"]["speedup"], ">=", 50.0),
    ("every HDN loss <= 4x ssi_loss", lambda r: max(r[c]["x_ssi"] for c in ("dr", "dp", "ds")), "<=", 4.0),
    ("memory >= 5x below the reference", lambda r: min(r[c]["mem_ratio"] for c in ("dr", "dp", "ds")), ">=", 5.0),
    ("memory <= 3x ssi_loss's", lambda r: max(r[c]["mem_x_ssi"] for c in ("dr", "dp", "ds")), "<=", 3.0),
    ("torch (CUDA) kernels <= 1.5x the CPU's", lambda r: _worst([r[c]["torch_over_cpu"] for c in CASES]), "<=", 1.5),
)
"""The speed and memory goals, per scene: (name, the figure from a scene's table, the
comparison, the bound). The last is timed on CPU only (n/a on CUDA)."""


def _worst(values: list[float]) -> float:
    """The largest of ``values``, NaN if any is NaN (a figure not measured here)."""
    return float("nan") if any(math.isnan(v) for v in values) else max(values)


def goal_rows(results: dict[str, dict]) -> list[tuple[str, list[tuple[float, bool | None]]]]:
    """Each goal's figure and whether it is met (None where the figure is not measured),
    per scene of ``results`` ({scene: the results of :func:`_table`}), in :data:`GOALS`'
    order.

    Examples:
        >>> row = {"speedup": 30.0, "x_ssi": 2.0, "mem_ratio": 8.0, "mem_x_ssi": 1.2, "torch_over_cpu": 1.2}
        >>> results = {"ramp": {c: dict(row) for c in CASES}}
        >>> results["ramp"]["ssi"]["over_nanmedian"] = 1.7
        >>> [(name.split()[0], met[0][1]) for name, met in goal_rows(results)][:4]
        [('ssi_loss', True), ('DR', True), ('DP', True), ('DS', False)]
    """
    rows = []
    for name, figure, op, bound in GOALS:
        cells = []
        for scene_results in results.values():
            value = float(figure(scene_results))
            met = None if math.isnan(value) else value >= bound if op == ">=" else value <= bound
            cells.append((value, met))
        rows.append((name, cells))
    return rows


def _print_goals(results: dict[str, dict], title: str) -> tuple[int, int]:
    """Print the goals table of one run; return how many goals are met on every scene, and
    how many were measured."""
    scenes = list(results)
    print(f"\n== {title}: goals per scene (figure, + met / - not met) ==")
    print(f"{'goal':<40}" + "".join(f" {s:>12}" for s in scenes))
    met_everywhere = measured = 0
    for name, cells in goal_rows(results):
        print(f"{name:<40}" + "".join(
            f" {'n/a':>12}" if ok is None else f" {v:>10.2f} {'+' if ok else '-'}" for v, ok in cells))
        if all(ok is not None for _, ok in cells):
            measured += 1
            met_everywhere += all(ok for _, ok in cells)
    print(f"goals met on every scene: {met_everywhere} of {measured}")
    return met_everywhere, measured


def _scaling_worker(args: argparse.Namespace, step) -> None:
    """Times of the hdn losses against pixels, levels and batch, as JSON rows."""
    rows = []
    sizes = args.scaling_sizes
    base = sizes[len(sizes) // 2 - 1] if len(sizes) > 1 else sizes[0]
    grid = [("pixels", s, args.levels, 2) for s in sizes]
    grid += [("levels", base, L, 4) for L in range(1, 7)]
    grid += [("batch", base, args.levels, b) for b in (1, 2, 4, 8, 16)]
    for axis, size, levels, batch in grid:
        pred0, target = _make_inputs(batch, size, args.device, getattr(torch, args.dtype), scene=args.scene)
        for case in CASES:
            if case == "ds" and 2 ** (levels - 1) > size:
                continue  # a grid finer than the image
            fn = _loss_fn("hdn", case, levels)

            def call(fn=fn, pred0=pred0, target=target):
                pred = pred0.clone().requires_grad_(True)
                fn(pred, target).backward()
                if args.device == "cuda":
                    torch.cuda.synchronize()

            call()
            call()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            rows.append({"axis": axis, "size": size, "levels": levels, "batch": batch,
                         "case": case, "time": statistics.median(times)})
    print(json.dumps(rows))


def _counts_worker(args: argparse.Namespace) -> None:
    """Host synchronisations and ATen operations per call of the torch path, by levels."""
    from torch.profiler import ProfilerActivity, profile

    pred0, target = _make_inputs(2, 64, args.device, getattr(torch, args.dtype), scene=args.scene)
    rows = []
    for case in CASES:
        for levels in range(1, 7):
            if case == "ssi" and levels > 1:
                continue
            fn = _on_torch_path(_loss_fn("hdn", case, levels))
            pred = pred0.clone().requires_grad_(True)
            fn(pred, target).backward()  # warm-up outside the profile
            pred = pred0.clone().requires_grad_(True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn(pred, target).backward()
            events = prof.key_averages()
            syncs = sum(e.count for e in events if e.key in ("aten::_local_scalar_dense", "aten::item"))
            ops = sum(e.count for e in events if e.key.startswith("aten::"))
            rows.append({"case": case, "levels": levels, "syncs": syncs, "ops": ops})
    print(json.dumps(rows))


def _scaling(cfg: argparse.Namespace) -> None:
    print(f"\n== {cfg.device}, scene {cfg.scene!r}: scaling of the hdn losses (forward+backward, "
          f"{cfg.threads} thread(s), medians of {cfg.repeats} calls) ==")
    rows = _run_worker("hdn", "dr", cfg, "scaling")
    print(f"{'axis':<7} {'size':>5} {'L':>2} {'B':>3}" + "".join(f" {c + ' ms':>9}" for c in CASES)
          + "".join(f" {c + ' ms/Mpl':>11}" for c in CASES))
    keys = sorted({(r["axis"], r["size"], r["levels"], r["batch"]) for r in rows},
                  key=lambda k: (("pixels", "levels", "batch").index(k[0]), k[1], k[2], k[3]))
    for axis, size, levels, batch in keys:
        got = {r["case"]: r["time"] for r in rows
               if (r["axis"], r["size"], r["levels"], r["batch"]) == (axis, size, levels, batch)}
        pixel_levels = {c: batch * size * size * (1 if c == "ssi" else levels) / 1e6 for c in CASES}
        print(f"{axis:<7} {size:>5} {levels:>2} {batch:>3}"
              + "".join(f" {got[c] * 1e3:9.1f}" if c in got else f" {'-':>9}" for c in CASES)
              + "".join(f" {got[c] * 1e3 / pixel_levels[c]:11.1f}" if c in got else f" {'-':>11}"
                        for c in CASES))
    print("(ms/Mpl: milliseconds per million pixel-levels, B x H x W x L; SSI counts L = 1)")


def _counts(cfg: argparse.Namespace) -> None:
    print(f"\n== host synchronisations and ATen operations per call (torch path, B=2, 64x64, "
          f"scene {cfg.scene!r}, forward+backward) ==")
    rows = _run_worker("hdn", "dr", cfg, "counts")
    print(f"{'loss':<5} {'L':>2} {'syncs':>6} {'aten ops':>9}")
    for r in rows:
        print(f"{r['case']:<5} {r['levels']:>2} {r['syncs']:>6} {r['ops']:>9}")


def _beyond_reference(device: str) -> None:
    import hdn

    print(f"\n== {device}: what the released code cannot do ==")
    size = 4100
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(1, 1, size, size, generator=gen) + 1).to(device)
    pred = torch.rand(1, 1, size, size, generator=gen).to(device).requires_grad_(True)
    try:
        torch.nanquantile(target.reshape(-1), 0.5)
        released = "ok"
    except RuntimeError as err:
        released = f"RuntimeError: {str(err).splitlines()[0][:60]}"
    t0 = time.perf_counter()
    loss = hdn.hdn_loss(pred, target, context="dp", levels=4)
    loss.backward()
    elapsed = time.perf_counter() - t0
    print(f"DP, one {size}x{size} image ({size * size} px > 2**24): torch.nanquantile -> {released}")
    print(f"  hdn: loss {loss.item():.4f}, finite grad {bool(torch.isfinite(pred.grad).all())}, {elapsed:.1f} s")
    for dtype in (torch.float16, torch.bfloat16):
        p = torch.rand(2, 1, 64, 64, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        g = (torch.rand(2, 1, 64, 64, generator=gen) + 1).to(device=device, dtype=dtype)
        row = []
        for case in ("dr", "dp", "ds"):
            loss = hdn.hdn_loss(p, g, context=case, levels=4)
            loss.backward()
            row.append(f"{case} {loss.item():.4f}")
        print(f"{dtype!s:>15}: " + ", ".join(row) + f"; grad dtype {p.grad.dtype}, finite {bool(torch.isfinite(p.grad).all())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="hdn", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="dr", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed hdn calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one timed reference call each)")
    parser.add_argument("--what", default="time", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="B=2, 128x128: a fast smoke run")
    parser.add_argument("--skip-large", action="store_true", help="skip the 4100x4100 DP check")
    parser.add_argument("--scene", default="ramp", help=argparse.SUPPRESS)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES,
                        help="scenes to time (default: all)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the scene tables and the goals table this many times")
    parser.add_argument("--scaling", action="store_true",
                        help="also time against pixels, levels and batch size")
    parser.add_argument("--scaling-sizes", nargs="+", type=int, default=[128, 256, 512, 1024],
                        help="image sides of the pixel-count scaling (the levels and batch "
                        "scaling use the second smallest)")
    parser.add_argument("--counts", action="store_true",
                        help="also count host synchronisations and ATen operations per call")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.batch, args.size = 2, 128
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        args.device = device
        met = []
        for run in range(args.runs):
            if args.runs > 1:
                print(f"\n#### {device}, run {run + 1} of {args.runs}")
            results = {}
            for scene in args.scenes:
                args.scene = scene
                results[scene] = _table(args)
            met.append(_print_goals(results, f"{device}, run {run + 1} of {args.runs}"))
        if args.runs > 1:
            print(f"\n{device}: goals met on every scene, per run: "
                  + ", ".join(f"{k} of {n}" for k, n in met))
        if args.scaling:
            args.scene = "loguniform"
            _scaling(args)
        if args.counts:
            args.scene = "motorcycle"
            _counts(args)
        if not args.skip_large:
            _beyond_reference(device)


if __name__ == "__main__":
    main()
