"""Parallel layout of a worker group, and the collectives the runtime and pipelines use.

A worker group is one model replica over N processes laid out as cfg × ulysses × ring × tp.
`ParallelDims` says the degrees and validates them with a message naming the numbers that
conflict; `ParallelState` holds this process's rank and process groups and is passed explicitly
(no module-level globals). Rank 0 talks to the scheduler; every command it receives is
broadcast to the other ranks (as protobuf bytes in a uint8 tensor, never pickle), so all ranks
run the same stages in lockstep.

The cfg axis is row parallelism: the transformer rows of a step (conditional and unconditional
rows of CFG requests) are split across the cfg ranks and gathered once per step. The ulysses and
ring axes shard one sample's tokens (worker/parallel/sequence.py). The tp axis splits heads and
MLP widths of the DiTs and text encoders (worker/parallel/tensor.py).

Rank layout: rank = ((c · R + r) · U + u) · T + t — tp innermost (its all-reduces are the most
frequent, so its ranks are neighbouring GPUs), then ulysses, then ring, cfg outermost. Within a
sequence group the rank order r · U + u is the order of the token shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist



@dataclass
class SequenceGroup:
    """This rank's place in the sequence group (ulysses × ring ranks sharing one sample's tokens):
    ranks and process groups only; the attention strategy over them is worker/parallel/sequence.py."""

    group: object  # all U × R ranks; group rank = sequence index = ring_rank * ulysses + ulysses_rank
    ulysses_group: object
    ring_group: object
    ulysses: int
    ring: int
    ulysses_rank: int
    ring_rank: int
    ring_peers: tuple[int, ...] = ()  # global ranks of the ring group, in ring order

    @property
    def size(self) -> int:
        return self.ulysses * self.ring

    @property
    def rank(self) -> int:
        return self.ring_rank * self.ulysses + self.ulysses_rank


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel axis; their product is the group's world size."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring * self.tp

    def problems(self, world_size: int) -> list[str]:
        """Why this layout cannot run on `world_size` processes (empty when it can)."""
        out = []
        for name in ("cfg", "ulysses", "ring", "tp"):
            if getattr(self, name) < 1:
                out.append(f"{name} degree must be >= 1 (got {getattr(self, name)})")
        if self.world_size != world_size:
            out.append(f"cfg {self.cfg} × ulysses {self.ulysses} × ring {self.ring} × tp {self.tp} = {self.world_size}, "
                       f"but --num-gpus is {world_size}")
        if self.cfg > 2:
            out.append(f"cfg degree {self.cfg}: CFG has two halves (conditional, unconditional), so at most 2")
        return out

    def head_problems(self, heads: int) -> list[str]:
        if heads % (self.ulysses * self.tp):
            return [f"{heads} attention heads do not divide by ulysses {self.ulysses} × tp {self.tp}"]
        return []

    @classmethod
    def auto(cls, num_gpus: int, enable_cfg_parallel: bool = True, ulysses: int = 0, ring: int = 0, tp: int = 0,
             heads: int | None = None) -> "ParallelDims":
        """Fills the degrees not given: CFG first (when enabled and it divides), then Ulysses as far
        as the heads allow (the largest divisor of what is left that divides `heads`), then Ring
        for the rest. Given degrees are kept as they are (problems() reports conflicts)."""
        tp = tp or 1
        cfg = 2 if enable_cfg_parallel and num_gpus % (2 * tp) == 0 and num_gpus >= 2 * tp else 1
        rest = max(1, num_gpus // (cfg * tp))
        if ulysses and ring:
            return cls(cfg=cfg, ulysses=ulysses, ring=ring, tp=tp)
        if ring:
            return cls(cfg=cfg, ulysses=max(1, rest // ring), ring=ring, tp=tp)
        if not ulysses:
            ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and (heads is None or (heads // tp) % d == 0))
        return cls(cfg=cfg, ulysses=ulysses, ring=max(1, rest // ulysses), tp=tp)

    def __str__(self) -> str:
        return f"cfg {self.cfg} × ulysses {self.ulysses} × ring {self.ring} × tp {self.tp}"


@dataclass
class ParallelState:
    """This process's place in the worker group and its process groups."""

    dims: ParallelDims
    rank: int = 0
    control: object = None  # gloo group over all ranks: command broadcast, also on GPU
    cfg_group: object = None
    cfg_rank: int = 0
    sequence: SequenceGroup | None = None  # the ulysses × ring group, when it has more than one rank
    tp_group: object = None
    tp_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls) -> "ParallelState":
        return cls(ParallelDims())

    @classmethod
    def init(cls, dims: ParallelDims, rank: int, init_method: str, device: torch.device) -> "ParallelState":
        """Joins the group (NCCL on GPU, gloo on CPU) and builds the per-axis groups (layout in the
        module docstring). Every rank creates every group, in the same order, as torch requires."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=dims.world_size)
        control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        c, r, u, t = dims.cfg, dims.ring, dims.ulysses, dims.tp

        def rank_of(ci: int, ri: int, ui: int, ti: int) -> int:
            return ((ci * r + ri) * u + ui) * t + ti

        def mine(groups: list[list[int]]):
            """Creates all the groups; returns (group, ranks) of the one holding this rank."""
            found = (None, [])
            for ranks in groups:
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    found = (group, ranks)
            return found

        cfg_group, _ = mine([[rank_of(ci, ri, ui, ti) for ci in range(c)] for ri in range(r) for ui in range(u) for ti in range(t)])
        seq_group, seq_ranks = mine([[rank_of(ci, ri, ui, ti) for ri in range(r) for ui in range(u)] for ci in range(c) for ti in range(t)])
        uly_group, uly_ranks = mine([[rank_of(ci, ri, ui, ti) for ui in range(u)] for ci in range(c) for ri in range(r) for ti in range(t)])
        ring_group, ring_ranks = mine([[rank_of(ci, ri, ui, ti) for ri in range(r)] for ci in range(c) for ui in range(u) for ti in range(t)])
        tp_group, tp_ranks = mine([[rank_of(ci, ri, ui, ti) for ti in range(t)] for ci in range(c) for ri in range(r) for ui in range(u)])
        sequence = None
        if len(seq_ranks) > 1:
            sequence = SequenceGroup(seq_group, uly_group, ring_group, u, r, uly_ranks.index(rank), ring_ranks.index(rank),
                                        tuple(ring_ranks))
        return cls(dims, rank=rank, control=control, cfg_group=cfg_group, cfg_rank=rank // (r * u * t), sequence=sequence,
                   tp_group=tp_group, tp_rank=tp_ranks.index(rank))

    # ---- command broadcast (rank 0 → all) ----

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0 passes the bytes, the others None; every rank returns them."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            dist.broadcast(buf, src=0, group=self.control)
        return bytes(buf.numpy())
