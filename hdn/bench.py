"""Benchmark: time and peak memory of hdn's losses against the slow reference.

``python -m hdn.bench`` prints, for forward + backward at B=8, 384x384, L=4, float32:
time and peak memory of ``hdn`` and of :mod:`hdn.reference` for DR, DP and DS, their
ratios, and each HDN loss's cost relative to :func:`hdn.ssi_loss`. It then checks what
the released code cannot do (DP on one 4100x4100 image, half precision), and repeats
the table on CUDA when a GPU is present.

Times: one fresh subprocess per loss runs ``hdn``, the reference and (for the HDN losses)
``hdn.ssi_loss`` in interleaved rounds, so that a machine whose speed drifts from minute
to minute (shared or throttled cores) slows all of them alike and the ratios stay
meaningful. Each round re-warms an implementation (two untimed calls) before timing
``--repeats`` calls of it, as in a training loop, then times one reference call; the
table gives medians over ``--rounds`` rounds. Peak memory: one fresh subprocess per
implementation and loss, so that the peak is its own: on CPU the peak resident set size
above the baseline taken after the inputs were built and one 16x16 call had paged in
the code; on CUDA ``torch.cuda.max_memory_allocated`` above the inputs. Use ``--quick``
for a smaller configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CASES = ("ssi", "dr", "dp", "ds")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_inputs(batch: int, size: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # a scene-like target: smooth depth plus noise, a few invalid pixels
    yy = torch.linspace(0, 1, size).view(1, size, 1)
    xx = torch.linspace(0, 1, size).view(1, 1, size)
    base = 1 + 9 * (yy * 0.7 + xx * 0.3) + 0.5 * torch.rand(batch, size, size, generator=gen)
    target = base.unsqueeze(1)
    target[:, :, :4, :4] = float("nan")
    pred = (torch.rand(batch, 1, size, size, generator=gen) + target.nan_to_num(1.0) * 0.5)
    return pred.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype)


def _loss_fn(impl: str, case: str, levels: int):
    if impl == "hdn":
        import hdn

        if case == "ssi":
            return lambda p, g: hdn.ssi_loss(p, g)
        return lambda p, g: hdn.hdn_loss(p, g, context=case, levels=levels)
    from hdn import reference

    if case == "ssi":
        return lambda p, g: reference.ssi_loss(p[:, 0], g[:, 0])
    return lambda p, g: reference.hdn_loss(p[:, 0], g[:, 0], context=case, levels=levels)


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype)
    pred0, target = _make_inputs(args.batch, args.size, device, dtype)
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
            step(fn)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        print(json.dumps({"peak": max(peak, 0)}))
        return
    # Interleaved rounds: hdn (and ssi_loss) re-warmed and timed ``repeats`` times, then one
    # reference call, so that drift in the machine's speed reaches every ratio alike.
    fns = {"hdn": _loss_fn("hdn", args.case, args.levels), "ref": _loss_fn("reference", args.case, args.levels)}
    if args.case != "ssi":
        fns["ssi"] = _loss_fn("hdn", "ssi", args.levels)
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
        f"\n== {cfg.device}: B={cfg.batch}, {cfg.size}x{cfg.size}, L={cfg.levels}, {cfg.dtype}, "
        f"forward+backward, {cfg.threads} thread(s); times: medians of {cfg.rounds} interleaved "
        f"rounds ({cfg.repeats} hdn calls and 1 reference call each) =="
    )
    results = {}
    for case in CASES:
        times = _run_worker("hdn", case, cfg, "time")
        results[case] = {
            "hdn": {"time": times["hdn"], **_run_worker("hdn", case, cfg, "memory")},
            "ref": {"time": times["ref"], **_run_worker("reference", case, cfg, "memory")},
            "ssi_time": times.get("ssi", times["hdn"]),
        }
    header = f"{'loss':<5} {'hdn ms':>9} {'ref ms':>9} {'speed-up':>9} {'hdn MiB':>9} {'ref MiB':>9} {'mem ratio':>9} {'x ssi':>7}"
    print(header)
    for case in CASES:
        h, r = results[case]["hdn"], results[case]["ref"]
        results[case]["speedup"] = r["time"] / h["time"]
        results[case]["mem_ratio"] = r["peak"] / max(h["peak"], 1)
        results[case]["x_ssi"] = h["time"] / results[case]["ssi_time"]
        print(
            f"{case:<5} {h['time'] * 1e3:9.1f} {r['time'] * 1e3:9.1f} {results[case]['speedup']:9.1f} "
            f"{h['peak'] / 2**20:9.1f} {r['peak'] / 2**20:9.1f} {results[case]['mem_ratio']:9.1f} "
            f"{results[case]['x_ssi']:7.2f}"
        )
    print("(x ssi: the loss's time over hdn.ssi_loss's, both from the same rounds)")
    return results


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
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.quick:
        args.batch, args.size = 2, 128
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s)")
    _table(args)
    if not args.skip_large:
        _beyond_reference("cpu")
    if torch.cuda.is_available():
        args.device = "cuda"
        _table(args)
        if not args.skip_large:
            _beyond_reference("cuda")


if __name__ == "__main__":
    main()
