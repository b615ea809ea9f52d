"""Distributed QAT: create_compressed_model in 2 CPU processes (torch.distributed, gloo) averages the ranges each
rank calibrated on its own shard, the model trains under DistributedDataParallel with the ranks identical, and
the result matches one process trained on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from models import REFERENCE_MODELS

import lowbit
from lowbit.backends.torch_fq import FakeQuantize

CONFIG = {"input_info": {"sample_size": [2, 1, 8, 8]},
          "compression": {"algorithm": "quantization", "preset": "mixed",
                          "initializer": {"range": {"num_init_samples": 8, "type": "min_max"}},
                          "weights": {"bits": 4}}}
STEPS, LR = 3, 0.05


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _shard(x, rank):
    return x[rank * 8:(rank + 1) * 8]


def _ranges(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in module.modules() if isinstance(m, FakeQuantize)
                      for p in m.parameters(recurse=False)])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        model = REFERENCE_MODELS["se"][0]()
        controller, q = lowbit.create_compressed_model(model, CONFIG, dataset=lowbit.Dataset([_shard(x, rank)]))
        controller.distributed()
        if rank == 0:
            torch.save({"state_dict": q.state_dict(), "compression_state": controller.get_compression_state()},
                       os.path.join(out, "start.pt"))
        start = _ranges(q)
        ddp = torch.nn.parallel.DistributedDataParallel(q.train())
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for _ in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank)).backward()
            opt.step()
        torch.save({"start_ranges": start, "state_dict": q.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears gloo down (one run saw a rank abort at the end)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)], \
        torch.load(os.path.join(out, "start.pt"), weights_only=False)


def test_range_initialization_is_averaged_over_the_ranks(ranks):
    (rank0, rank1), _ = ranks
    x, _ = _data()
    model = REFERENCE_MODELS["se"][0]()
    alone = [_ranges(lowbit.create_compressed_model(model, CONFIG, dataset=lowbit.Dataset([_shard(x, r)]))[1])
             for r in (0, 1)]
    assert not torch.allclose(alone[0], alone[1])  # the shards calibrate differently
    assert torch.equal(rank0["start_ranges"], rank1["start_ranges"])
    torch.testing.assert_close(rank0["start_ranges"], (alone[0] + alone[1]) / 2)


def test_ranks_stay_identical_and_match_one_process_on_the_whole_batch(ranks):
    (rank0, rank1), start = ranks
    for name, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][name]), name
    x, y = _data()
    model = REFERENCE_MODELS["se"][0]()
    _, single = lowbit.create_compressed_model(model, CONFIG, compression_state=start["compression_state"])
    single.load_state_dict(start["state_dict"])
    single.train()
    opt = torch.optim.SGD(single.parameters(), lr=LR)
    for _ in range(STEPS):  # the mean over the whole batch: what DDP's averaged gradients of two halves give
        opt.zero_grad()
        F.cross_entropy(single(x), y).backward()
        opt.step()
    moved = 0
    for name, value in single.state_dict().items():
        torch.testing.assert_close(rank0["state_dict"][name], value, atol=2e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(value, start["state_dict"][name])
    assert moved > 10  # training changed the weights and ranges
