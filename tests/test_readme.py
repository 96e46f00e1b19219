"""The README's "Use it in your training code" section runs: its ```python blocks, in order,
in one namespace, on a small model and a batch of small tensors (what the section says
the reader's data loader gives)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use it in your training code"


def _section_blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text
    body = text.split(SECTION, 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


def _namespace() -> dict:
    gen = torch.Generator().manual_seed(0)
    B, H, W = 2, 16, 24
    depth = 1 + 9 * torch.rand(B, 1, H, W, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    batch = {
        "image": torch.rand(B, 3, H, W, generator=gen),
        "depth": depth,
        "lidar_valid": torch.rand(B, 1, H, W, generator=gen) > 0.6,  # sparse
        "sky": torch.zeros(B, 1, H, W, dtype=torch.bool).index_fill_(2, torch.arange(3), True),
        "dataset_weight": torch.tensor([1.0, 2.0]),
    }
    return {"model": model, "batch": batch}


def test_readme_training_section_has_the_promised_examples():
    code = "\n".join(_section_blocks())
    for needle in ('mask = batch["lidar_valid"] & ~batch["sky"]', 'reduction="none"', 'reduction="per_image"',
                   "ModuleDict", "torch.autocast", "torch.compile", "dist.all_reduce", 'space="inverse_depth"'):
        assert needle in code, needle


def test_readme_training_section_code_runs():
    torch._dynamo.reset()
    namespace = _namespace()
    blocks = _section_blocks()
    assert len(blocks) >= 6
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    # what the blocks computed is what they claim
    assert namespace["m"].shape == (2, 1, 16, 24)
    assert namespace["per_image"].shape == (2,)
    assert torch.isfinite(namespace["total"]) and torch.isfinite(namespace["weighted"])
    assert namespace["loss"].dtype == torch.float64
