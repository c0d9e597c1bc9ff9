"""Parallel layout of a worker group, and the collectives the runtime and pipelines use.

A worker group is one model replica over N processes laid out as cfg × ulysses × ring × tp.
`ParallelDims` says the degrees and validates them with a message naming the numbers that
conflict; `ParallelState` holds this process's rank and process groups and is passed explicitly
(no module-level globals). Rank 0 talks to the scheduler; every command it receives is
broadcast to the other ranks (as protobuf bytes in a uint8 tensor, never pickle), so all ranks
run the same stages in lockstep.

Implemented today: the cfg axis (row parallelism: the transformer rows of a step — conditional
and unconditional rows of CFG requests — are split across the cfg ranks and gathered once per
step). Ulysses, Ring and tensor parallel are refused at start until they exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
        unbuilt = [n for n in ("ulysses", "ring", "tp") if getattr(self, n) > 1]
        if unbuilt:
            out.append(f"{', '.join(unbuilt)} parallelism is not implemented yet; use --enable-cfg-parallel with --num-gpus 2")
        return out

    @classmethod
    def auto(cls, num_gpus: int, enable_cfg_parallel: bool = True) -> "ParallelDims":
        """CFG first (when allowed), then the rest on Ulysses (refused by problems() until built)."""
        cfg = 2 if enable_cfg_parallel and num_gpus % 2 == 0 else 1
        return cls(cfg=cfg, ulysses=num_gpus // cfg)


@dataclass
class ParallelState:
    """This process's place in the worker group and its process groups."""

    dims: ParallelDims
    rank: int = 0
    control: object = None  # gloo group over all ranks: command broadcast, also on GPU
    cfg_group: object = None
    cfg_rank: int = 0
    _gathers: int = field(default=0, repr=False)

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
        """Joins the group (NCCL on GPU, gloo on CPU) and builds the per-axis groups.
        Rank = ((cfg_index × ulysses + u) × ring + r) × tp + t."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=dims.world_size)
        control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        inner = dims.world_size // dims.cfg  # ranks per cfg half
        cfg_group = None
        for offset in range(inner):
            ranks = [offset + i * inner for i in range(dims.cfg)]
            group = dist.new_group(ranks)  # every rank must create every group, in the same order
            if rank in ranks:
                cfg_group = group
        return cls(dims, rank=rank, control=control, cfg_group=cfg_group, cfg_rank=rank // inner)

    # ---- command broadcast (rank 0 → all) ----

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0 passes the bytes, the others None; every rank returns them."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8)
        if int(size):
            dist.broadcast(buf, src=0, group=self.control)
        return bytes(buf.numpy())

    # ---- row parallelism over the cfg axis ----

    def row_parallel(self, model):
        """Wraps model(x, t, ctx) so each cfg rank runs an equal contiguous share of the rows and
        all ranks get every row's output (one all-gather per step). With one CFG request the
        conditional row runs on cfg rank 0 and the unconditional row on cfg rank 1."""
        if self.dims.cfg == 1:
            return model

        def run(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            rows, n = x.shape[0], self.dims.cfg
            share = math.ceil(rows / n)
            pad = share * n - rows
            if pad:  # repeat the last row so every rank runs the same count
                x, t, ctx = (torch.cat([a, a[-1:].expand(pad, *a.shape[1:])]) for a in (x, t, ctx))
            lo = self.cfg_rank * share
            out = model(x[lo : lo + share], t[lo : lo + share], ctx[lo : lo + share]).contiguous()
            gathered = [torch.empty_like(out) for _ in range(n)]
            dist.all_gather(gathered, out, group=self.cfg_group)
            return torch.cat(gathered)[:rows]

        return run
