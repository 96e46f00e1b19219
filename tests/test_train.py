"""Training loop of hdn.toy.train: losses by name, determinism, checkpoints, metrics, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hdn.toy.synthetic import make_split, save_split
from hdn.toy.train import LOSS_NAMES, TrainConfig, make_loss, train

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"abs_rel", "delta1", "delta2", "delta3", "rmse", "fine_detail_error", "wall_time_s"}


@pytest.fixture(scope="module")
def tiny():
    """Eight 32 x 32 training scenes and four test scenes."""
    return {"train": make_split(8, 5, 32, 32), "test": make_split(4, 5, 32, 32, stream=1)}


def _config(**options) -> TrainConfig:
    base = {
        "loss": "hdn-dr",
        "steps": 4,
        "batch_size": 4,
        "base": 8,
        "depth": 2,
        "lr": 3e-3,
        "crop": 16,
    }
    return TrainConfig(**{**base, **options})


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_name_is_zero_for_an_affine_copy_and_positive_otherwise(name):
    g = torch.rand(2, 1, 16, 16) + 1
    mask = torch.ones_like(g, dtype=torch.bool)
    loss = make_loss(name, levels=2)
    generator = torch.Generator().manual_seed(0)
    assert float(loss(2.5 * g - 0.5, g, mask, generator=generator)) < 1e-4
    assert float(loss(torch.rand_like(g), g, mask, generator=generator)) > 0.1


def test_make_loss_and_config_reject_bad_options():
    with pytest.raises(ValueError, match="Invalid loss"):
        make_loss("hdn-xx")
    with pytest.raises(ValueError, match="levels"):
        make_loss("hdn-dr", levels=0)
    for bad in ({"steps": -1}, {"batch_size": 0}, {"crop": 10}, {"lr": 0.0}, {"resume": True}):
        with pytest.raises(ValueError):
            TrainConfig(**{"depth": 2, **bad})


def test_training_decreases_the_loss(tiny):
    result = train(_config(loss="ssi", steps=30, batch_size=8), tiny, progress=False)
    first, last = sum(result.history[:5]) / 5, sum(result.history[-5:]) / 5
    assert len(result.history) == 30 and last < 0.9 * first


def test_two_runs_give_identical_weights_and_leave_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    a = train(_config(hflip=True), tiny, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = train(_config(hflip=True), tiny, progress=False)
    assert _same_weights(a.model, b.model) and a.history == b.history
    c = train(_config(seed=1), tiny, progress=False)
    assert not _same_weights(a.model, c.model)


@pytest.mark.parametrize("loss", ["hdn-dr", "hdn-rc"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, loss):
    whole = train(_config(loss=loss, steps=6, grad_matching=0.5), tiny, progress=False)
    first = _config(loss=loss, steps=3, grad_matching=0.5, out_dir=str(tmp_path), evaluate=False)
    train(first, tiny, progress=False)
    resumed = train(replace(first, steps=6, resume=True), tiny, progress=False)
    assert _same_weights(whole.model, resumed.model)
    assert resumed.history == whole.history


def test_resume_refuses_a_checkpoint_trained_with_other_options(tiny, tmp_path):
    config = _config(steps=2, out_dir=str(tmp_path), evaluate=False)
    train(config, tiny, progress=False)
    with pytest.raises(ValueError, match="other options"):
        train(replace(config, steps=4, loss="ssi", resume=True), tiny, progress=False)


def test_checkpoint_and_metrics_json_are_written(tiny, tmp_path):
    result = train(
        _config(steps=2, checkpoint_every=1, out_dir=str(tmp_path)), tiny, progress=False
    )
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["loss"] == "hdn-dr"
    assert {"model", "optimizer", "history", "rng_state"} <= set(state)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= set(report) and report["config"]["steps"] == 2
    assert report["abs_rel"] == pytest.approx(result.metrics["abs_rel"])
    assert 0 <= report["delta1"] <= 1


def test_gradient_matching_term_changes_the_training(tiny):
    plain = train(_config(steps=2, evaluate=False), tiny, progress=False)
    matched = train(_config(steps=2, evaluate=False, grad_matching=1.0), tiny, progress=False)
    assert matched.history[0] > plain.history[0]


def test_cli_trains_two_steps_and_writes_metrics(tiny, tmp_path):
    save_split(tmp_path / "tiny.npz", tiny)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "hdn.toy.train", "--loss", "hdn-dp", "--levels", "2", "--steps", "2",
        "--batch-size", "2", "--base", "8", "--depth", "2", "--data", str(tmp_path / "tiny.npz"),
        "--out", str(out), "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    report = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(report) and report["steps"] == 2
    command[command.index("--steps") + 1] = "4"
    subprocess.run([*command, "--resume"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
