"""hdn.toy.train under DDP: two CPU ranks (gloo, 127.0.0.1, a free port) against one process.

The ranks are started with :func:`torch.multiprocessing.spawn` and join a process group
initialised as ``torchrun`` would (``env://``: MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE); :func:`hdn.toy.train.train` finds the group and splits each global batch
between them. With the same global batch, the global valid-pixel count as the loss's
denominator and DDP's gradient average, the run equals the single-process run up to the
order of floating-point sums.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hdn.toy.synthetic import make_split, save_split
from hdn.toy.train import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, config: TrainConfig, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        result = train(config, data=data, progress=False)
        torch.save(
            {"state": result.model.state_dict(), "history": torch.tensor(result.history, dtype=torch.float64),
             "metrics": {k: float(v) for k, v in result.metrics.items() if not k.endswith("_s")}},
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "tiny.npz"
    save_split(path, {"train": make_split(8, 5, 32, 32), "test": make_split(2, 5, 32, 32, stream=1)})
    return str(path)


CONFIG = TrainConfig(loss="hdn-dr", levels=3, steps=3, batch_size=4, base=8, depth=2, lr=3e-3, crop=16, device="cpu")


@pytest.mark.parametrize("loss", ["hdn-dr", "ssi"])
def test_two_gloo_ranks_match_a_single_process_run_with_the_same_global_batch(split_file, tmp_path, loss):
    config = replace(CONFIG, loss=loss, out_dir=str(tmp_path / "ddp"), checkpoint_every=2)
    mp.spawn(_rank_main, args=(2, _free_port(), split_file, config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = train(replace(config, out_dir=None, checkpoint_every=0), data=split_file, progress=False)

    # the ranks hold the same model and log the same (reduced) loss
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["history"], ranks[1]["history"], rtol=0, atol=0)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # rank 0's evaluation, broadcast
    # ... equal to the single-process run on the same global batch
    torch.testing.assert_close(ranks[0]["history"], torch.tensor(single.history, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    for key, value in single.model.state_dict().items():
        if key == "head.bias":
            # The losses ignore a shift of the prediction: the output bias's gradient is 0 up
            # to rounding noise, which Adam turns into steps of up to lr in either run, and
            # in either direction: the runs may part by up to twice that.
            assert float((ranks[0]["state"][key] - value).abs().max()) <= 2 * config.steps * config.lr
            continue
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ranks[0]["metrics"]["abs_rel"], single.metrics["abs_rel"], rtol=1e-4, atol=1e-6)
    # rank 0 wrote the checkpoint: the unwrapped model, loadable into a single-process run
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and set(saved["model"]) == set(single.model.state_dict())
    assert (tmp_path / "ddp" / "metrics.json").exists()


def test_a_batch_size_that_the_ranks_cannot_split_evenly_is_refused(split_file, tmp_path):
    config = replace(CONFIG, batch_size=3, steps=1)
    port = _free_port()
    with pytest.raises(Exception, match="batch_size"):
        mp.spawn(_rank_main, args=(2, port, split_file, config, str(tmp_path)), nprocs=2, join=True)
