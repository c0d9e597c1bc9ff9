"""Per-request LoRA inside one batched forward (issue 17): each row of a DiT forward may run with
its own adapters, and no weight is ever merged.

A targeted linear computes, for the rows (B, ...) of a forward,

    y = x @ W^T + b                                    one base GEMM over every row
    y[i] += sum_a (x[i] @ A_a^T @ B_a^T + c_a) * s_ia  over the adapters a of row i

where A_a (r, in) / B_a (out, r) / c_a (an optional lora_B bias) are adapter a's weights for this
module and s_ia the row's scale for it (the request's scale times the module's alpha / r). That is
PEFT's LoRA layer (what diffusers' load_lora_weights + set_adapters run) applied to a subset of the
rows: `lora_B(lora_A(x)) * scaling` added to the base output.

The low-rank terms of all rows are two batched GEMMs, whatever the mix of adapters: a row's adapters
are laid side by side along the rank (x A_a^T B_a^T + x A_b^T B_b^T = x [A_a; A_b]^T [B_a, B_b]^T),
its scales folded into the stacked A, zeros where a row has fewer (or no) adapter ranks, so

    h = bmm(x, A_rows^T)          (n, L, in) @ (n, in, r) -> (n, L, r)
    y.baddbmm_(h, B_rows^T)       y (n, L, out) += h @ (n, r, out), accumulated by the GEMM (no delta tensor)

with n the forward's row blocks (consecutive rows with the same adapters form one block: a CFG pair
is one). The stacks are built once per module and adapter mix (`RowPlan`) and kept while the mix
recurs (a batch keeps its mix for many steps), so a step pays two launches per linear.

- `LoraWeights`: one adapter, resident on the device (read by worker/lora_files.py).
- `LoraLinear`: an nn.Linear whose class is swapped in place (`LoraLayers`), so weights, names and
  the state dict stay the model's; without an active batch it is a plain linear.
- `RowPlan`: a forward's rows and their adapters, and each module's stacked pairs for them.
- `LoraLayers`: owns the swapped linears of one DiT, the plan in flight (`rows(...)`) and the
  recent plans.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank pair, in the module's weight dtype on its device."""

    down: torch.Tensor  # A: (r, in)
    up: torch.Tensor  # B: (out, r)
    bias: torch.Tensor | None  # lora_B's bias, (out,), or None
    scaling: float  # lora_alpha / r (PEFT's; 1.0 where the file has no alpha)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias) if t is not None)


@dataclass(eq=False)
class LoraWeights:
    """One adapter: its name and a low-rank pair per targeted module (dotted names in the DiT,
    e.g. `blocks.0.attn1.to_q`). Compared by identity: one object per loaded file."""

    name: str
    modules: dict[str, LoraModule]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(m.nbytes for m in self.modules.values())


RowAdapters = Sequence[tuple[LoraWeights, float]]  # one row's adapters with their scales

MAX_PLANS = 8  # recent adapter mixes kept with their stacks (a step may run one forward per size)
KEPT_BYTES = 4 << 30  # stacks of the mixes before the last one, at most (ServedLora: --lora-cache-bytes)


@dataclass(frozen=True)
class ModuleStack:
    """One module's low-rank pairs for the row blocks of a plan, ready for `bmm` + `baddbmm_`."""

    blocks: slice | None  # the blocks from the first to the last with an adapter here; None: all of them
    down_t: torch.Tensor  # (n, in, r): each block's A^T, its adapters side by side, scales folded in
    up_t: torch.Tensor  # (n, r, out): each block's B^T, the same order
    bias: torch.Tensor | None  # (n, 1, out): each block's scaled lora_B biases summed; None: no adapter has one
    nbytes: int  # what the stack holds beyond the adapters' own tensors


class RowPlan:
    """The rows of a forward with their adapters, and, built on first use, each module's stacked
    low-rank pairs for them (`add`). Rows form blocks of `block` consecutive rows with the same
    adapters (the largest size that divides every run of equal rows); a plan of one block (every row
    the same adapters) applies to any row count, as a step-cached forward runs its later blocks on
    some of its rows only. Holds its adapters weakly: `alive` is False once one is gone."""

    def __init__(self, per_row: Sequence[RowAdapters]):
        rows = [tuple((a, float(s)) for a, s in r) for r in per_row]
        assert rows, "a forward has rows"
        runs, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[start]:  # LoraWeights compare by identity
                runs.append(i - start)
                start = i
        self.count = len(rows)
        self.block = math.gcd(*runs)
        # Each block's adapters, held weakly (the forward's caller holds them while stacks are built).
        self.blocks = [tuple((weakref.ref(a), s) for a, s in r) for r in rows[::self.block]]
        adapters = {id(a): a for r in rows for a, _ in r}
        self.names = frozenset(name for a in adapters.values() for name in a.modules)  # modules some row adapts
        self.refs = tuple(weakref.ref(a) for a in adapters.values())
        self.stacks: dict[str, ModuleStack | None] = {}
        self.nbytes = 0  # the stacks' own memory

    @property
    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)

    def add(self, name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the low-rank terms of module `name` for input x: (rows, ..., in) -> out (rows, ..., out)."""
        if name not in self.stacks:
            stack = self.stacks[name] = self._stack(name)
            self.nbytes += 0 if stack is None else stack.nbytes
        stack = self.stacks[name]
        if stack is None:
            return
        n = len(self.blocks)
        assert n == 1 or x.shape[0] == self.count, "a LoRA row plan is for all rows of a forward"
        if x.dim() == 3 and x.shape[0] == n:  # (rows, L, in), one row per block: as it is (a view costs host time)
            x3, out3 = x, out
        else:
            x3 = x.reshape(n, -1, x.shape[-1])  # (n, block rows x tokens, in): a view for a contiguous x
            out3 = out.view(n, -1, out.shape[-1])  # (n, ..., out)
        if stack.blocks is not None:
            x3, out3 = x3[stack.blocks], out3[stack.blocks]
        h = torch.bmm(x3, stack.down_t)  # (n', L, r)
        out3.baddbmm_(h, stack.up_t)  # (n', L, out) += h @ B^T, accumulated by the GEMM itself
        if stack.bias is not None:
            out3.add_(stack.bias)

    def _stack(self, name: str) -> ModuleStack | None:
        """Module `name`'s pairs for the blocks (None: no block's adapters have it). The scales are
        folded into A the same way whatever the mix (so a row's result does not depend on its batch's
        other rows beyond the GEMMs' own shapes), multiplied as Python numbers: in float32 at least,
        rounded once, and no host-to-device copy (no stream sync)."""
        per_block = [[(m, s * m.scaling) for ref, s in adapters if (m := ref().modules.get(name)) is not None]
                     for adapters in self.blocks]
        used = [i for i, pairs in enumerate(per_block) if pairs]
        if not used:
            return None
        blocks = None if used[-1] + 1 - used[0] == len(per_block) else slice(used[0], used[-1] + 1)
        per_block = per_block[used[0]:used[-1] + 1]
        some = per_block[0][0][0]
        (out_features, _), in_features = some.up.shape, some.down.shape[1]
        rank = max(sum(m.down.shape[0] for m, _ in pairs) for pairs in per_block)
        downs, ups, biases = [], [], []
        for pairs in per_block:
            down, up = [m.down * s for m, s in pairs], [m.up for m, _ in pairs]  # (r_a, in), (out, r_a) each
            if (r := sum(m.down.shape[0] for m, _ in pairs)) < rank:  # zeros: fewer (or no) adapter ranks here
                down.append(some.down.new_zeros(rank - r, in_features))
                up.append(some.up.new_zeros(out_features, rank - r))
            downs.append(down[0] if len(down) == 1 else torch.cat(down))  # (rank, in)
            ups.append(up[0] if len(up) == 1 else torch.cat(up, dim=1))  # (out, rank)
            biases.append([(m.bias, s) for m, s in pairs if m.bias is not None])
        bias = None
        if any(biases):
            wide = torch.promote_types(some.up.dtype, torch.float32)
            bias = torch.zeros(len(per_block), 1, out_features, dtype=wide, device=some.up.device)
            for i, pairs in enumerate(biases):
                for c, s in pairs:
                    bias[i, 0].add_(c.to(wide), alpha=s)
            bias = bias.to(some.up.dtype)  # (n, 1, out)
        down = torch.stack(downs)  # (n, rank, in)
        up = ups[0][None] if len(ups) == 1 else torch.stack(ups)  # (n, out, rank); one block, one adapter: its B as it is
        shared = up.data_ptr() == some.up.data_ptr()
        nbytes = sum(_nbytes(t) for t in (down, bias) if t is not None) + (0 if shared else _nbytes(up))
        return ModuleStack(blocks, down.transpose(1, 2), up.transpose(1, 2), bias, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LoraTerms:
    """The low-rank terms of the batch in flight for one linear module (mixed into its class).
    `lora_name` is the module's dotted name in its DiT; `lora_layers` the owner holding the batch."""

    lora_name: str
    lora_layers: LoraLayers

    @property
    def adapting(self) -> bool:
        """Whether some row of the batch in flight has an adapter on this module (a fused
        GEMM + activation must then run unfused, the low-rank term going in before the activation)."""
        plan = self.lora_layers.plan
        return plan is not None and self.lora_name in plan.names

    def add_lora(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the rows' low-rank terms for input x."""
        plan = self.lora_layers.plan
        if plan is not None and self.lora_name in plan.names:
            plan.add(self.lora_name, x, out)


class LoraLinear(LoraTerms, nn.Linear):
    """nn.Linear plus the low-rank terms of the batch in flight (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (B, ..., out): the one base GEMM
        self.add_lora(x, out)
        return out


def lora_class(module: nn.Module) -> type | None:
    """The LoRA-capable class a module's class is swapped to: LoraLinear for an nn.Linear, a class's
    own `lora_class` (the tensor-parallel row-parallel layer's), else None (not adaptable)."""
    if type(module) in (nn.Linear, LoraLinear):
        return LoraLinear
    return getattr(type(module), "lora_class", None)


class LoraLayers:
    """The LoRA-capable linears of one DiT, the batch in flight and the recent adapter mixes.

    `install(model, targets)` swaps the class of each named nn.Linear to LoraLinear (in place: same
    parameters, same state dict). `rows(per_row)` makes a forward's rows run with their adapters:
    row i of every targeted linear's input uses per_row[i]. Inside it, the model must run eagerly
    (a CUDA graph or a compiled graph would replay without the low-rank terms), and every targeted
    linear must see the forward's rows on its first dim. The plans of the last MAX_PLANS adapter
    mixes stay (their stacks cost about one adapter's size per row block), those before the last
    one within `kept_bytes`, each until one of its adapters is freed.
    """

    def __init__(self, targets: dict[str, nn.Linear], kept_bytes: int = KEPT_BYTES):
        self.targets = targets  # dotted name -> the (swapped) linear
        self.kept_bytes = kept_bytes
        self.plan: RowPlan | None = None  # the forward in flight's
        self.plans: OrderedDict[tuple, RowPlan] = OrderedDict()  # by adapter mix, least recently used first

    @classmethod
    def install(cls, model: nn.Module, names: Sequence[str]) -> LoraLayers:
        modules = dict(model.named_modules())
        layers = cls({})
        for name in names:
            linear = modules[name]
            kind = lora_class(linear)
            assert kind is not None, f"{name} is a {type(linear).__name__}, not a linear"
            linear.__class__ = kind
            linear.lora_name, linear.lora_layers = name, layers
            layers.targets[name] = linear
        return layers

    @contextlib.contextmanager
    def rows(self, per_row: Sequence[RowAdapters]) -> Iterator[None]:
        assert self.plan is None, "one LoRA batch at a time"
        self.plan = self._plan(per_row)
        try:
            yield
        finally:
            self.plan = None
            # The last plan stays whatever its size (the next step likely runs it, and its forward had
            # all its stacks at once anyway); the ones before it within kept_bytes.
            older = list(self.plans.values())[:-1]
            while older and sum(p.nbytes for p in older) > self.kept_bytes:
                self.plans.popitem(last=False)
                older.pop(0)

    def _plan(self, per_row: Sequence[RowAdapters]) -> RowPlan:
        """The plan for this adapter mix: a kept one (its stacks built), else a new one."""
        for key in [k for k, p in self.plans.items() if not p.alive]:  # an id of a freed adapter may come back
            del self.plans[key]
        key = tuple(tuple((id(a), float(s)) for a, s in row) for row in per_row)
        plan = self.plans.pop(key, None) or RowPlan(per_row)
        self.plans[key] = plan
        while len(self.plans) > MAX_PLANS:
            self.plans.popitem(last=False)
        return plan


def linear_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Dotted names of the model's linear layers an adapter may target (`lora_class`), less
    those under any prefix in `exclude`."""
    return [name for name, m in model.named_modules()
            if lora_class(m) is not None and not any(name == p or name.startswith(p + ".") for p in exclude)]
