"""The GPU check: tests, host syncs, speed, memory and a training step of ``hdn`` on one device.

``python benchmarks/gpu_check.py --device cuda --out DIR`` (``make gpu-check``) runs, in about
five minutes on one GPU, and writes ``DIR/gpu_check.txt`` and ``DIR/gpu_check.json``:

1. exactness on the device: every loss and reduction against ``hdn.reference`` on the CPU,
   float64 values and gradients within 1e-6, over shapes with holes and ties; then pytest of
   ``tests/test_engine.py`` (whose CUDA test runs under ``set_sync_debug_mode("error")``);
2. host syncs: forward + backward of every loss and reduction under
   ``torch.cuda.set_sync_debug_mode("error")``, the first failing call named;
3. speed and memory (B=8, 384x384, L=4, float32, forward + backward): ``hdn`` eager and
   compiled, the per-context-mask algorithm and the ``nanmedian`` SSI of
   ``benchmarks/bench.py``, medians of timed calls after warm-up (synchronised), peak
   ``torch.cuda.max_memory_allocated``; scaling from 256x256 to 1024x1024 and B=32;
4. a training step: a small U-Net at 384x384, B=8, bfloat16 autocast, with each loss and with
   a plain L1 loss; the loss's share of the step;
5. notebook 05 executed on the device (its assertions hold).

``--device cpu --quick`` runs the same script on the CPU with small sizes (tested).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench

import hdn
from hdn import reference

REDUCTIONS = ("mean", "sum", "per_image", "none")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _loss(kind: str, levels: int):
    if kind == "ssi":
        return lambda p, g, r="mean": hdn.ssi_loss(p, g, reduction=r)
    return lambda p, g, r="mean": hdn.hdn_loss(p, g, context=kind, levels=levels, reduction=r)


def exactness(device: str, quick: bool) -> dict:
    """Max relative error of values and gradients against the reference, per loss."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 9, 13), (1, 16, 20)] if quick else [(2, 9, 13), (1, 16, 20), (3, 17, 31), (2, 32, 32)]
    out = {}
    for kind in ("ssi", "dr", "dp", "ds"):
        worst = 0.0
        for shape in shapes:
            for ties in (False, True):
                pred = torch.randn(shape, generator=gen, dtype=torch.float64)
                target = torch.rand(shape, generator=gen, dtype=torch.float64) * 4 + 1
                if ties:
                    target = target.round()
                target[0, :2, :3] = float("nan")
                for reduction in REDUCTIONS:
                    p_dev = pred.detach().clone().to(device).requires_grad_(True)
                    got = _loss(kind, 3)(p_dev, target.to(device), reduction)
                    p_ref = pred.detach().clone().requires_grad_(True)
                    ref = reference.ssi_loss(p_ref, target, reduction=reduction) if kind == "ssi" else (
                        reference.hdn_loss(p_ref, target, context=kind, levels=3, reduction=reduction))
                    weight = torch.linspace(1, 2, ref.numel(), dtype=torch.float64).view(ref.shape)
                    (got * weight.to(device)).sum().backward()
                    (ref * weight).sum().backward()
                    scale = float(ref.detach().abs().max()) + 1e-12
                    worst = max(worst, float((got.detach().cpu() - ref.detach()).abs().max()) / scale)
                    if not ties:  # (with ties in the target the median's pixel may differ)
                        gscale = float(p_ref.grad.abs().max()) + 1e-12
                        worst = max(worst, float((p_dev.grad.cpu() - p_ref.grad).abs().max()) / gscale)
        out[kind] = {"max_relative_error": worst, "ok": worst <= 1e-6}
    return out


def pytest_run(device: str) -> dict:
    """``tests/test_engine.py`` (its CUDA test runs where a GPU is present)."""
    tests = HERE.parent / "tests" / "test_engine.py"
    if not tests.exists():
        return {"skipped": "tests/test_engine.py not found (run from a clone)"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tests)],
        capture_output=True, text=True, cwd=HERE.parent, check=False,
    )  # fmt: skip
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def host_syncs(device: str) -> dict:
    """Per loss: "none", or the first call that synchronised (CUDA); "n/a" elsewhere."""
    if device != "cuda":
        return {kind: "n/a (CPU)" for kind in ("ssi", "dr", "dp", "ds")}
    out = {}
    pred, target = bench.make_inputs("lidar", 2, 64, device)
    for kind in ("ssi", "dr", "dp", "ds"):
        out[kind] = "none"
        for reduction in REDUCTIONS:
            p = pred.clone().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _loss(kind, 4)(p, target, reduction).sum().backward()
            except RuntimeError as error:
                out[kind] = f"{reduction}: {str(error).splitlines()[0]}"
                break
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return out


def _time(fn, pred0, target, repeats: int) -> float:
    """Median ms of ``repeats`` forward + backward calls (bench's step: synchronised), after two."""
    for _ in range(2):
        bench._step(fn, pred0, target)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        bench._step(fn, pred0, target)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _peak_mib(fn, pred0, target, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pred = pred0.clone().requires_grad_(True)
    fn(pred, target).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def speed(device: str, quick: bool) -> dict:
    batch, size, levels = (2, 64, 3) if quick else (8, 384, 4)
    repeats = 2 if quick else 10
    out = {}
    for scene in ("motorcycle", "lidar") if quick else bench.SCENES:
        pred, target = bench.make_inputs(scene, batch, size, device)
        rows = {}
        for kind in ("ssi", "dr", "dp", "ds"):
            fns = {"hdn": bench.loss_function("hdn", kind, levels)}
            if not quick:
                fns["compiled"] = bench.loss_function("compiled", kind, levels)
            fns["baseline"] = bench.loss_function("nanmedian" if kind == "ssi" else "mask", kind, levels)
            row = {name: _time(fn, pred, target, 1 if name == "baseline" and kind == "ds" else repeats)
                   for name, fn in fns.items()}
            row["speedup"] = row["baseline"] / row["hdn"]
            row["peak_mib"] = _peak_mib(fns["hdn"], pred, target, device)
            rows[kind] = row
        out[scene] = rows
    scaling = {}
    for b, s in [(2, 64), (4, 128)] if quick else [(8, 256), (8, 512), (8, 1024), (32, 384)]:
        pred, target = bench.make_inputs("loguniform", b, s, device)
        scaling[f"B={b}, {s}x{s}"] = {
            kind: _time(bench.loss_function("hdn", kind, levels), pred, target, repeats)
            for kind in ("ssi", "dr", "dp", "ds")
        }
    return {"config": {"batch": batch, "size": size, "levels": levels}, "scenes": out, "scaling_ms": scaling}


def training_step(device: str, quick: bool) -> dict:
    """Step time of a small U-Net with each loss and with L1, bfloat16 autocast."""
    from hdn.toy.models import UNet

    batch, size = (2, 64) if quick else (8, 384)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, size, size, generator=gen).to(device)
    _, depth = bench.make_inputs("motorcycle", batch, size, device)
    model = UNet(base=16 if quick else 32, depth=3).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    losses = {"l1": lambda p, g: (p - g.nan_to_num(0)).abs().mean()}
    losses |= {kind: _loss(kind, 4) for kind in ("ssi", "dr", "dp", "ds")}
    out = {}
    for name, loss_fn in losses.items():
        def step(loss_fn=loss_fn, name=name):
            with torch.autocast(device, dtype=torch.bfloat16):
                pred = model(image)
            loss = loss_fn(pred.float() if name == "l1" else pred, depth)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)

        for _ in range(2):
            step()
        times = []
        for _ in range(3 if quick else 10):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[name] = 1e3 * statistics.median(times)
    shares = {name: max(out[name] - out["l1"], 0.0) / out[name] for name in out if name != "l1"}
    return {"step_ms": out, "loss_share": shares}


def notebook_05(device: str) -> dict:
    """Notebook 05 executed top to bottom (it picks CUDA itself when present)."""
    path = HERE.parent / "notebooks" / "05_toy_training.ipynb"
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        return {"ok": True, "seconds": time.perf_counter() - start}
    except Exception as error:  # noqa: BLE001  (reported, not raised: the other results stand)
        return {"ok": False, "error": str(error).splitlines()[0][:300]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="build/gpu-check")
    parser.add_argument("--quick", action="store_true", help="small sizes (for a CPU test)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "speed", "training", "notebook"])
    args = parser.parse_args(argv)
    device = args.device
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result: dict = {"device": device, "card": name, "torch": torch.__version__}
    steps = {
        "exactness": lambda: exactness(device, args.quick),
        "pytest": lambda: pytest_run(device),
        "host_syncs": lambda: host_syncs(device),
        "speed": lambda: speed(device, args.quick),
        "training_step": lambda: training_step(device, args.quick),
        "notebook_05": lambda: notebook_05(device),
    }
    skipped = {"tests": ("pytest",), "speed": ("speed",), "training": ("training_step",), "notebook": ("notebook_05",)}
    for part, run in steps.items():
        if any(part in skipped[s] for s in args.skip):
            continue
        start = time.perf_counter()
        result[part] = run()
        print(f"{part}: done in {time.perf_counter() - start:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "gpu_check.txt").write_text(report(result))
    print(report(result))
    return result


def report(result: dict) -> str:
    """The results as text tables."""
    lines = [f"device {result['device']} ({result['card']}), torch {result['torch']}"]
    if "exactness" in result:
        lines.append("exactness vs reference (float64, max relative error): " + ", ".join(
            f"{k} {v['max_relative_error']:.1e}{'' if v['ok'] else ' FAIL'}" for k, v in result["exactness"].items()))
    if "pytest" in result:
        lines.append(f"tests/test_engine.py: {result['pytest'].get('summary', result['pytest'])}")
    if "host_syncs" in result:
        lines.append("host syncs: " + ", ".join(f"{k} {v}" for k, v in result["host_syncs"].items()))
    if "speed" in result:
        cfg = result["speed"]["config"]
        lines.append(f"\nforward + backward, B={cfg['batch']}, {cfg['size']}x{cfg['size']}, L={cfg['levels']}, ms:")
        lines.append(f"{'scene':<12}{'loss':<6}{'hdn':>9}{'compiled':>10}{'baseline':>10}{'speed-up':>10}{'peak MiB':>10}")
        for scene, rows in result["speed"]["scenes"].items():
            for kind, row in rows.items():
                lines.append(f"{scene:<12}{kind:<6}{row['hdn']:>9.2f}{row.get('compiled', float('nan')):>10.2f}"
                             f"{row['baseline']:>10.2f}{row['speedup']:>10.2f}{row['peak_mib']:>10.1f}")
        lines.append("scaling (hdn eager, ms): " + "; ".join(
            f"{k}: " + ", ".join(f"{kind} {ms:.1f}" for kind, ms in v.items())
            for k, v in result["speed"]["scaling_ms"].items()))
    if "training_step" in result:
        t = result["training_step"]
        lines.append("\ntraining step (U-Net, bf16 autocast), ms: " + ", ".join(f"{k} {v:.1f}" for k, v in t["step_ms"].items()))
        lines.append("loss share of the step: " + ", ".join(f"{k} {v:.1%}" for k, v in t["loss_share"].items()))
    if "notebook_05" in result:
        lines.append(f"notebook 05: {result['notebook_05']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
