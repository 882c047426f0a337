"""Lip-sync InfoNCE: negatives from every clip of the data-parallel group, gradients to the local part;
one positive per causal block."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dualforce_mega.diffusion.losses import info_nce, pool_blocks

TEMPERATURE = 0.1
ROWS = (3, 5)          # valid rows per rank: unequal, so the gather pads
DIM = 8


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(1, ROWS[rank], DIM, generator=g), torch.randn(1, ROWS[rank], DIM, generator=g)


def reference(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s loss over all ranks' rows, and its gradient w.r.t. its own rows only."""
    data = [rank_data(r) for r in range(len(ROWS))]
    a_local = data[rank][0][0].clone().requires_grad_(True)
    s_local = data[rank][1][0].clone().requires_grad_(True)
    a_all = torch.cat([a_local if r == rank else d[0][0] for r, d in enumerate(data)])
    s_all = torch.cat([s_local if r == rank else d[1][0] for r, d in enumerate(data)])
    a, s = F.normalize(a_local, dim=-1), F.normalize(s_local, dim=-1)
    a_n, s_n = F.normalize(a_all, dim=-1).detach(), F.normalize(s_all, dim=-1).detach()
    # this rank's rows stay differentiable inside the gathered keys too
    off = sum(ROWS[:rank])
    a_n = torch.cat([a_n[:off], a, a_n[off + ROWS[rank]:]])
    s_n = torch.cat([s_n[:off], s, s_n[off + ROWS[rank]:]])
    labels = off + torch.arange(ROWS[rank])
    loss = 0.5 * (F.cross_entropy(a @ s_n.t() / TEMPERATURE, labels) + F.cross_entropy(s @ a_n.t() / TEMPERATURE, labels))
    loss.backward()
    return loss.detach(), a_local.grad, s_local.grad


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a, s = (t.requires_grad_(True) for t in rank_data(rank))
        loss = info_nce(a, s, torch.ones(ROWS[rank], dtype=torch.bool), TEMPERATURE, dist.group.WORLD)
        loss.backward()
        out[rank] = (loss.detach(), a.grad[0], s.grad[0])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_negatives_are_gathered_over_the_data_parallel_group() -> None:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(len(ROWS), _free_port(), out), nprocs=len(ROWS), join=True)
    for rank in range(len(ROWS)):
        loss, ga, gs = out[rank]
        ref_loss, ref_ga, ref_gs = reference(rank)
        assert abs(float(loss - ref_loss)) < 1e-6
        torch.testing.assert_close(ga, ref_ga, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs, ref_gs, rtol=1e-5, atol=1e-6)
    # more negatives than the local batch alone: the gathered loss differs from the local one
    a, s = rank_data(0)
    local = info_nce(a, s, torch.ones(ROWS[0], dtype=torch.bool), TEMPERATURE)
    assert abs(float(local - out[0][0])) > 1e-3


def test_one_positive_per_causal_block() -> None:
    emb = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)     # [B, F=5, D=1]
    valid = torch.tensor([False, True, True, True, True])              # frame 0: the reference
    pooled, ok = pool_blocks(emb, valid, block=2)                        # blocks {0,1} {2,3} {4}
    assert ok.tolist() == [True, True, True]
    assert pooled[0, :, 0].tolist() == [1.0, 2.5, 4.0]                   # block 0 averages frame 1 only
    same, ok1 = pool_blocks(emb, valid, block=1)
    assert same is emb and ok1 is valid
