"""Time every control of every workbook explorer from Python (no browser).

Builds each explorer on the inputs its notebook uses (untrained toy models for notebook 05),
moves each control through a few values and prints the median and largest redraw time of
each (control change -> PNG in the ``Output`` widget). Not a test: timings depend on the
machine. Run it with ``python tests/browser/redraw_times.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _motorcycle(step: int):
    from hdn.data import blurred, middlebury_motorcycle

    scene = middlebury_motorcycle()
    g = scene.depth[::step, ::step][None]
    valid = scene.valid[::step, ::step][None]
    pred = blurred(torch.where(valid, g, g[valid].median()), sigma=2.0)
    return g, valid, pred


def explorers():
    """(notebook, explorer, [(control name, widget, values)]) for every explorer."""
    from hdn.data import near_far_scene
    from hdn.toy.models import UNet
    from hdn.workbook.explorer import ContextExplorer, GridExplorer
    from hdn.workbook.gradients import DescentExplorer, smooth_within
    from hdn.workbook.training_explorer import LevelExplorer

    g, valid, pred = _motorcycle(2)
    ex = ContextExplorer(g[0], valid[0], pred[0], kinds=("dr", "dp"), levels=4)
    yield "02 ContextExplorer", ex, [
        ("kind", ex.kind, ["dp", "dr", "dp", "dr"]),
        ("level", ex.level, [2, 3, 0, 1, 2, 3]),
        ("index", ex.index, [1, 2, 3, 4, 5, 6]),
    ]
    ex = GridExplorer(g[0], valid[0], pred[0], levels=4)
    yield "03 GridExplorer", ex, [
        ("level", ex.level, [2, 3, 0, 1, 2, 3]),
        ("cell", ex.index, [1, 2, 3, 4, 5, 6]),
    ]
    depth2, ok2 = near_far_scene(96, 128, seed=0, dtype=torch.float64)
    g2, valid2 = depth2[None], ok2[None]
    near = valid2 & (g2 < 5)
    bend = 1 + 0.1 * torch.sin(torch.pi * torch.linspace(0, 1, g2.shape[-1]))
    pred2s = torch.where(near, smooth_within(g2, near, 6.0), g2 * bend)
    regions = {"near object": near, "background": valid2 & ~near}
    ex = DescentExplorer(pred2s, g2, valid2, regions=regions, steps=40, lr=1e-3, max_level=4,
                         loss="dr", level=2)
    for c, L in ([] if os.environ.get("QUICK") else [("ssi", 1), ("dr", 2), ("dr", 3), ("dp", 2), ("dp", 3), ("dp", 4), ("ds", 2), ("ds", 3)]):
        ex.curves(c, L)  # the notebook computes these runs before it shows the widget
    yield "04 DescentExplorer", ex, [
        ("step", ex.step, [10, 20, 30, 0, 5, 40]),
        ("loss", ex.loss, ["dp", "ds", "dr", "dp"]),
        ("level", ex.level, [3, 2, 3, 2]),
    ]
    torch.manual_seed(0)
    models = {name: UNet() for name in ("ssi", "hdn-dr", "hdn-dp", "hdn-ds")}
    rgb = torch.rand(3, 64, 64)
    gt = torch.linspace(1.0, 8.0, 64 * 64).view(64, 64) + torch.rand(64, 64)
    ex = LevelExplorer(models, rgb, gt, levels=4)
    ex.context.value, ex.level.value = "dp", 2
    yield "05 LevelExplorer", ex, [
        ("context", ex.context, ["dr", "ds", "dp", "dr"]),
        ("level", ex.level, [0, 1, 3, 2]),
        ("model", ex.model, ["hdn-dr", "hdn-dp", "hdn-ds", "ssi"]),
    ]


def main() -> None:
    from hdn.workbook.plotting import use_workbook_style

    use_workbook_style(dpi=80)  # as the notebooks do
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the times (seconds) as JSON to this file")
    args = parser.parse_args()
    rows = []
    for notebook, ex, controls in explorers():
        for name, control, values in controls:
            times = []
            for value in values:
                start = time.perf_counter()
                control.value = value
                times.append(time.perf_counter() - start)
            rows.append({"explorer": notebook, "control": name,
                         "median_s": statistics.median(times), "max_s": max(times)})
    print(f"{'explorer':<20}{'control':<10}{'median (s)':>12}{'max (s)':>10}")
    for r in rows:
        print(f"{r['explorer']:<20}{r['control']:<10}{r['median_s']:>12.3f}{r['max_s']:>10.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
