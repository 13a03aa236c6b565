"""DDP: a meta-batch split across two CPU processes (gloo) gives the meta-gradient of the whole
meta-batch on one process, because each rank averages its share and DDP averages the ranks.

Run with ``pytest -m slow tests/test_ddp_meta_gradient.py`` (spawning processes is slow)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from sharebone.data.episodes import EpisodeSampler
from sharebone.data.tasks import MetaBatches
from sharebone.regimes import MAML, MetaSGD

SPEC = {"name": "conv4", "in_channels": 1, "hidden": 4, "image_size": 16}
PRESETS = {"maml": MAML, "metasgd": MetaSGD}
META_BATCH = 4


def source():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 16, 16), generator=g, dtype=torch.uint8)
    return EpisodeSampler(images, torch.arange(60) // 5, n_way=3, k_shot=1, q_query=2)


def build(name: str) -> MAML:
    torch.manual_seed(0)
    return PRESETS[name](SPEC, n_way=3, inner_steps=2, inner_lr=0.1, vmap=False).double()


def as_double(episode):
    e = episode.to_float()
    return type(e)(e.support.double(), e.support_labels, e.query.double(), e.query_labels,
                   e.classes)


class LossOf(torch.nn.Module):
    """What Lightning's DDP wrapper does: the training step runs inside DDP's forward."""

    def __init__(self, model: MAML) -> None:
        super().__init__()
        self.model = model

    def forward(self, episode):
        return self.model.episode_loss(episode)[0]


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        grads = {}
        for name in PRESETS:
            model = build(name)
            share = MetaBatches(source(), META_BATCH, length=1, rank=rank, world_size=world_size)
            ddp = DistributedDataParallel(LossOf(model))
            ddp(as_double(share[0])).backward()
            grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes import torch + Lightning: ~30 s on 2 busy cores
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_meta_batch_split_across_two_ranks_gives_the_single_process_meta_gradient(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    split = torch.load(out, weights_only=True)
    for name in PRESETS:
        model = build(name)
        whole = MetaBatches(source(), META_BATCH, length=1)[0]
        model.episode_loss(as_double(whole))[0].backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(split[name][k], p.grad, rtol=1e-9, atol=1e-12, msg=k)
