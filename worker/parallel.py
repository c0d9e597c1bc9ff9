"""Parallel layout of a worker group, and the collectives the runtime and pipelines use.

A worker group is one model replica over N processes laid out as cfg × ulysses × ring × tp.
`ParallelDims` says the degrees and validates them with a message naming the numbers that
conflict; `ParallelState` holds this process's rank and process groups and is passed explicitly
(no module-level globals). Rank 0 talks to the scheduler; every command it receives is
broadcast to the other ranks (as protobuf bytes in a uint8 tensor, never pickle), so all ranks
run the same stages in lockstep.

Implemented today: the cfg axis (row parallelism: the transformer rows of a step — conditional
and unconditional rows of CFG requests — are split across the cfg ranks and gathered once per
step) and Ulysses sequence parallelism for Wan DiTs. Ring and tensor parallel are refused at
start until they exist.
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
        unbuilt = [n for n in ("ring", "tp") if getattr(self, n) > 1]
        if unbuilt:
            out.append(f"{', '.join(unbuilt)} parallelism is not implemented yet; use --enable-cfg-parallel and --ulysses-degree")
        return out

    def head_problems(self, heads: int) -> list[str]:
        if heads % (self.ulysses * self.tp):
            return [f"{heads} attention heads do not divide by ulysses {self.ulysses} × tp {self.tp}"]
        return []

    @classmethod
    def auto(cls, num_gpus: int, enable_cfg_parallel: bool = True, ulysses: int = 0) -> "ParallelDims":
        """CFG first (when allowed), then Ulysses for the rest (or the given Ulysses degree)."""
        if ulysses:
            return cls(cfg=max(1, num_gpus // ulysses) if enable_cfg_parallel else 1, ulysses=ulysses)
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
    sequence: SequenceParallel | None = None  # the Ulysses group, when ulysses > 1
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
        sequence = None
        for start in range(0, dims.world_size, dims.ulysses):  # ring = tp = 1: consecutive ranks
            ranks = list(range(start, start + dims.ulysses))
            group = dist.new_group(ranks) if dims.ulysses > 1 else None
            if rank in ranks and group is not None:
                sequence = SequenceParallel(group, dims.ulysses, rank - start)
        return cls(dims, rank=rank, control=control, cfg_group=cfg_group, cfg_rank=rank // inner, sequence=sequence)

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


@dataclass
class SequenceParallel:
    """Ulysses sequence parallelism inside one DiT forward: tokens are sharded over `size` ranks
    once before the first block and gathered once after the last; self-attention swaps the shard
    from tokens to heads (all-to-all), attends over the whole sequence, and swaps back. Token
    counts that do not divide evenly are padded; padded keys are masked out."""

    group: object
    size: int
    rank: int

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous share of `x` along `dim`, padded with zeros to equal shares."""
        length = x.shape[dim]
        share = math.ceil(length / self.size)
        pad = share * self.size - length
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * share, share)

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Inverse of shard: every rank gets the full tensor (padding dropped)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)

    def _swap(self, x: torch.Tensor, to_heads: bool) -> torch.Tensor:
        b, n, heads, d = x.shape
        u = self.size
        if to_heads:  # (B, L/u, H, D) -> (B, L, H/u, D)
            send = x.reshape(b, n, u, heads // u, d).permute(2, 0, 1, 3, 4).contiguous()  # (u, B, L/u, H/u, D) by head group
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)  # dim 0 now: source rank = token block
            return recv.permute(1, 0, 2, 3, 4).reshape(b, u * n, heads // u, d)
        # (B, L, H/u, D) -> (B, L/u, H, D)
        send = x.reshape(b, u, n // u, heads, d).permute(1, 0, 2, 3, 4).contiguous()  # (u, B, L/u, H/u, D) by token block
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # dim 0 now: source rank = head group
        return recv.permute(1, 2, 0, 3, 4).reshape(b, n // u, u * heads, d)

    def attention(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
        """Self-attention over the full sequence of `length` tokens from token shards (B, L/u, H, D)."""
        q, k, v = (self._swap(t, to_heads=True) for t in (q, k, v))  # (B, L_pad, H/u, D)
        mask = None
        if q.shape[1] != length:
            mask = (torch.arange(q.shape[1], device=q.device) < length)[None].expand(q.shape[0], -1)  # (B, L_pad)
        out = attend(q, k, v, key_mask=mask)
        return self._swap(out.contiguous(), to_heads=False)
