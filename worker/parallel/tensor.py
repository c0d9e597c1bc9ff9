"""Tensor parallelism by module surgery on already loaded models (Megatron-style, inference only).

Each of the T ranks of a tp group keeps 1/T of every attention's heads and of every MLP's
hidden features. Projections into heads / hidden features are *column-parallel*: an nn.Linear
whose weight keeps only this rank's output rows (no communication). Projections back to the
model width are *row-parallel* (`RowParallelLinear`): the matching input columns, a local
matmul, one all_reduce (sum) over the tp group, the bias added once after it. So each attention
and each MLP costs one all_reduce of its output; everything else (embedders, modulation, norms
over the model width, output heads) stays replicated, as it is small.

Rank t holds heads [t·H/T, (t+1)·H/T) and hidden features [t·F/T, (t+1)·F/T). Attention modules
get `heads` (or `n_heads` / `num_heads`) divided by T, so they unflatten to their local heads;
sequence parallelism then works on those local heads (Ulysses splits them further).

A DiT is split by its family's declarative plan (worker/parallel/plans/<family>.py), e.g.
{"blocks.*.attn1": Heads(norms=("norm_q", "norm_k")), "blocks.*.ffn": MLP()}, applied by `apply_tp`;
`shard_text_encoder` splits the transformers T5 /
UMT5 encoders and Qwen2 / Qwen2.5-VL / Llama decoder layers (see its docstring for what stays
whole). Parameters are replaced by copies of their slices, so the full weights are freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffserve.worker.models.lora import LoraTerms

Ranges = list[tuple[int, int]]  # [start, stop) index ranges along one weight dim, concatenated in order


def _share(n: int, tp: int, rank: int, offset: int = 0) -> tuple[int, int]:
    """This rank's contiguous range of n items (n divisible by tp), shifted by offset."""
    assert n % tp == 0, f"{n} does not divide by tp {tp}"
    size = n // tp
    return offset + rank * size, offset + (rank + 1) * size


def _take(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    # clone: a view would keep the whole tensor's storage alive
    return torch.cat([t.narrow(dim, lo, hi - lo) for lo, hi in ranges], dim=dim).clone()


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


# ---------------------------------------------------------------------------------------------
# Parallel layers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpShard:
    """What one tp rank keeps of a linear layer, recorded on it as `tp_shard` (an adapter for the
    layer is cut the same way, worker/lora_files.py): `ranges` of its `full` output features (dim 0,
    column-parallel) or input features (dim 1, row-parallel)."""

    dim: int
    ranges: Ranges
    full: int

    @property
    def first(self) -> bool:
        """Rank 0's share (it starts at feature 0): a row-parallel layer's additive terms go in there
        only, as the all_reduce sums every rank's partial result."""
        return self.ranges[0][0] == 0

    def unsplit(self, linear: nn.Module) -> tuple[int, int]:
        """The layer's (in_features, out_features) before the split."""
        return (self.full, linear.out_features) if self.dim == 1 else (linear.in_features, self.full)

    def cut_lora(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None):
        """This rank's share of a LoRA pair for the layer: a column-parallel layer's rows of lora_B (and
        of its bias), a row-parallel layer's columns of lora_A and the bias on the first rank only."""
        if self.dim == 0:
            return down, _take(up, 0, self.ranges), None if bias is None else _take(bias, 0, self.ranges)
        return _take(down, 1, self.ranges), up, bias if self.first else None


def column_parallel(linear: nn.Linear, ranges: Ranges) -> nn.Linear:
    """Keeps only the output features in `ranges` (weight rows and bias), in place."""
    linear.tp_shard = TpShard(0, ranges, linear.out_features)
    linear.weight = _param(_take(linear.weight.data, 0, ranges), linear.weight)
    if linear.bias is not None:
        linear.bias = _param(_take(linear.bias.data, 0, ranges), linear.bias)
    linear.out_features = linear.weight.shape[0]
    return linear


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split over the tp group.

    Owns this rank's columns of the weight (out, in/T) and the whole bias. forward takes this
    rank's input features (the output of the matching column-parallel layer) and returns the
    full result on every rank: all_reduce(x_local @ W_localᵀ) + b.
    """

    lora_class: type  # its LoRA-capable class (below), which LoraLayers swaps in

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, requires_grad: bool = False,
                 shard: TpShard | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=requires_grad) if bias is not None else None
        self.out_features, self.in_features = weight.shape
        self.group = group
        self.tp_shard = shard

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranges: Ranges, group) -> RowParallelLinear:
        bias = linear.bias.data if linear.bias is not None else None
        shard = TpShard(1, ranges, linear.in_features)
        return cls(_take(linear.weight.data, 1, ranges), bias, group, linear.weight.requires_grad, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.partial(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """(N..., out): this rank's share of the sum over the input features."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, bias={self.bias is not None}"


class LoraRowParallelLinear(LoraTerms, RowParallelLinear):
    """RowParallelLinear plus the low-rank terms of the batch in flight (worker/models/lora.py),
    added to this rank's partial sum, so the one all_reduce sums them as well: each adapter holds
    this rank's columns of lora_A and the whole lora_B, and lora_B's bias on the first rank only."""

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        y = super().partial(x)
        self.add_lora(x, y)
        return y


RowParallelLinear.lora_class = LoraRowParallelLinear


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a feature dim split across the tp group (Wan's q/k norm across all heads).

    Keeps this rank's slice of the weight; the mean of squares is the all-reduced sum of the local
    squares over the full width. Same arithmetic as torch's RMSNorm: float32 inside, weight
    applied before casting back. models.layers.qk_norm_rope calls it as a module (it is not one of
    the single-rank RMSNorms it fuses).
    """

    def __init__(self, norm: nn.RMSNorm, ranges: Ranges, group):
        super().__init__()
        (self.full_dim,) = norm.normalized_shape
        self.eps = norm.eps
        self.weight = _param(_take(norm.weight.data, 0, ranges), norm.weight) if norm.weight is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (N..., D/T)
        squares = xf.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=self.group)
        eps = self.eps if self.eps is not None else torch.finfo(xf.dtype).eps
        out = xf * torch.rsqrt(squares / self.full_dim + eps)
        if self.weight is not None:
            out = out * self.weight
        return out.to(x.dtype)


def _group_info(state) -> tuple[int, int, object]:
    return state.dims.tp, state.tp_rank, state.tp_group


# ---------------------------------------------------------------------------------------------
# DiTs
# ---------------------------------------------------------------------------------------------


def _shard_attention(attn: nn.Module, tp: int, rank: int, group, norms_across_heads: tuple[str, ...] = ()) -> None:
    """Our DiT attentions (WanAttention, FluxAttention, QwenImageAttention, HunyuanVideoAttention): heads split, outputs row-parallel."""
    inner = attn.to_q.out_features
    heads = _share(inner, tp, rank)
    assert attn.heads % tp == 0, f"{attn.heads} heads do not divide by tp {tp}"
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        if getattr(attn, name, None) is not None:
            column_parallel(getattr(attn, name), [heads])
    for name in norms_across_heads:
        if getattr(attn, name, None) is not None:
            setattr(attn, name, ParallelRMSNorm(getattr(attn, name), [heads], group))
    if getattr(attn, "to_out", None) is not None:
        attn.to_out[0] = RowParallelLinear.from_linear(attn.to_out[0], [heads], group)
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = RowParallelLinear.from_linear(attn.to_add_out, [heads], group)
    attn.heads //= tp


def _shard_feed_forward(ff: nn.Module, tp: int, rank: int, group) -> None:
    """layers.FeedForward: net.0.proj column-parallel, net.2 row-parallel."""
    hidden = [_share(ff.net[0].proj.out_features, tp, rank)]
    column_parallel(ff.net[0].proj, hidden)
    ff.net[2] = RowParallelLinear.from_linear(ff.net[2], hidden, group)


def _shard_parallel_block(block: nn.Module, attn: str, mlp: str, out: str, tp: int, rank: int, group) -> None:
    """Attention and an MLP side by side, one output linear over cat([attn, mlp]) (FLUX / HunyuanVideo
    single-stream blocks): its shard takes this rank's columns of both parts, in that order."""
    attention, up = getattr(block, attn), getattr(block, mlp)
    inner, width = attention.to_q.out_features, up.out_features
    column_parallel(up, [_share(width, tp, rank)])
    _shard_attention(attention, tp, rank, group)
    setattr(block, out, RowParallelLinear.from_linear(getattr(block, out), [_share(inner, tp, rank), _share(width, tp, rank, inner)], group))


# ---- the declarative plan: {module name pattern: style}, applied by `apply_tp` ----


@dataclass(frozen=True)
class Heads:
    """An attention (to_q/k/v and add_q/k/v_proj, to_out.0 / to_add_out, `heads`): split by heads;
    `norms` are q/k norms over all heads (Wan), which become ParallelRMSNorm. Per-head norms stay."""

    norms: tuple[str, ...] = ()

    def apply(self, module: nn.Module, tp: int, rank: int, group) -> None:
        _shard_attention(module, tp, rank, group, self.norms)

    def widths(self, module: nn.Module) -> list[int]:
        return []


@dataclass(frozen=True)
class MLP:
    """A two-layer MLP with diffusers' FeedForward keys (net.0.proj column-, net.2 row-parallel)."""

    def apply(self, module: nn.Module, tp: int, rank: int, group) -> None:
        _shard_feed_forward(module, tp, rank, group)

    def widths(self, module: nn.Module) -> list[int]:
        return [module.net[0].proj.out_features]


@dataclass(frozen=True)
class ParallelBlock:
    """A block whose attention `attn` and MLP up-projection `mlp` run side by side on one input and
    whose `out` linear reads cat([attention, mlp]) (FLUX / HunyuanVideo single-stream blocks)."""

    attn: str = "attn"
    mlp: str = "proj_mlp"
    out: str = "proj_out"

    def apply(self, module: nn.Module, tp: int, rank: int, group) -> None:
        _shard_parallel_block(module, self.attn, self.mlp, self.out, tp, rank, group)

    def widths(self, module: nn.Module) -> list[int]:
        return [getattr(module, self.mlp).out_features]


Style = Heads | MLP | ParallelBlock
TPPlan = dict[str, Style]  # module name pattern (fnmatch, '*' one index) -> how that module is split


def _named(name: str, pattern: str) -> bool:
    """Whether a dotted module name matches a pattern component by component ('*' is one component)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _matches(model: nn.Module, plan: TPPlan) -> list[tuple[nn.Module, Style]]:
    """(module, style) for every module of `model` named by a pattern of `plan`, in model order."""
    found = []
    for name, module in model.named_modules():
        for pattern, style in plan.items():
            if _named(name, pattern):
                found.append((module, style))
                break
    return found


def tp_problems(model: nn.Module, plan: TPPlan | None, tp: int) -> list[str]:
    """Why `plan` cannot split `model` over `tp` ranks (empty when it can); heads are checked by
    ParallelDims.head_problems."""
    if tp == 1:
        return []
    if not plan:
        return [f"{type(model).__name__} has no tensor-parallel path; use --tp-size 1"]
    widths = {w for module, style in _matches(model, plan) for w in style.widths(module)}
    return [f"MLP width {w} does not divide by tp {tp}" for w in sorted(widths) if w % tp]


def apply_tp(model: nn.Module, plan: TPPlan, state) -> nn.Module:
    """Splits the modules `plan` names over `state.tp_group`, in place; returns the model.
    Everything the plan does not name (embedders, modulation, norms over the model width, output
    heads) stays replicated."""
    tp, rank, group = _group_info(state)
    if tp == 1:
        return model
    problems = tp_problems(model, plan, tp)
    if problems:
        raise ValueError("; ".join(problems))
    for module, style in _matches(model, plan):  # matched first: styles replace submodules
        style.apply(module, tp, rank, group)
    return model


def dit_problems(models: list[nn.Module], tp: int) -> list[str]:
    """Why these DiTs cannot be split over `tp` ranks (empty when they can): no plan with a TP part
    (worker/parallel/plans/), or MLP widths that do not divide."""
    from diffserve.worker.parallel.plans import find_plan

    out = []
    for m in models:
        plan = find_plan(m)
        out += tp_problems(m, plan.tp if plan is not None else None, tp)
    return out


def shard_dit(model: nn.Module, state) -> nn.Module:
    """Splits a DiT over `state.tp_group` by its family's plan (worker/parallel/plans/<family>.py), in place."""
    from diffserve.worker.parallel.plans import find_plan

    plan = find_plan(model)
    if plan is None or not plan.tp:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel path; use --tp-size 1")
    return apply_tp(model, plan.tp, state)


# ---------------------------------------------------------------------------------------------
# Text encoders (transformers models)
# ---------------------------------------------------------------------------------------------

T5_ATTENTION = frozenset({"T5Attention", "UMT5Attention"})
T5_MLP = frozenset({"T5DenseActDense", "T5DenseGatedActDense", "UMT5DenseActDense", "UMT5DenseGatedActDense"})
DECODER_ATTENTION = frozenset({"Qwen2_5_VLAttention", "Qwen2Attention", "LlamaAttention"})
DECODER_MLP = frozenset({"Qwen2MLP", "LlamaMLP"})  # Qwen2.5-VL's vision MLP (Qwen2_5_VLMLP) is not here on purpose
SUPPORTED = T5_ATTENTION | T5_MLP | DECODER_ATTENTION | DECODER_MLP


def _shard_t5_attention(attn: nn.Module, tp: int, rank: int, group) -> bool:
    if attn.n_heads % tp:
        return False
    heads = [_share(attn.inner_dim, tp, rank)]
    for name in ("q", "k", "v"):
        column_parallel(getattr(attn, name), heads)
    attn.o = RowParallelLinear.from_linear(attn.o, heads, group)
    if attn.has_relative_attention_bias:  # (buckets, n_heads): its output is this rank's heads' bias
        bias = attn.relative_attention_bias
        bias.weight = _param(_take(bias.weight.data, 1, [_share(attn.n_heads, tp, rank)]), bias.weight)
        bias.embedding_dim = bias.weight.shape[1]
    attn.n_heads //= tp
    attn.inner_dim //= tp
    return True


def _shard_mlp(mlp: nn.Module, ups: tuple[str, ...], down: str, tp: int, rank: int, group) -> bool:
    width = getattr(mlp, ups[0]).out_features
    if width % tp:
        return False
    hidden = [_share(width, tp, rank)]
    for name in ups:
        column_parallel(getattr(mlp, name), hidden)
    setattr(mlp, down, RowParallelLinear.from_linear(getattr(mlp, down), hidden, group))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size //= tp
    return True


def _shard_decoder_attention(attn: nn.Module, tp: int, rank: int, group) -> bool:
    """q_proj / k_proj / v_proj / o_proj with GQA. K/V heads are split when they divide by tp; when
    tp divides by them, each rank keeps the one K/V head its query heads read (replicated)."""
    d = attn.head_dim
    heads = attn.q_proj.out_features // d
    kv = attn.k_proj.out_features // d
    if heads % tp or (kv % tp and tp % kv):
        return False
    q_range = _share(heads * d, tp, rank)
    if kv % tp == 0:
        kv_range = _share(kv * d, tp, rank)
    else:  # tp ranks per K/V head: rank's query heads all fall in K/V head rank // (tp / kv)
        kv_range = _share(kv * d, kv, rank // (tp // kv))
    column_parallel(attn.q_proj, [q_range])
    column_parallel(attn.k_proj, [kv_range])
    column_parallel(attn.v_proj, [kv_range])
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, [q_range], group)
    local_heads, local_kv = heads // tp, (kv_range[1] - kv_range[0]) // d
    for name, value in (("num_heads", local_heads), ("num_key_value_heads", local_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    attn.num_key_value_groups = local_heads // local_kv  # read by transformers' attention functions
    return True


def shard_text_encoder(module: nn.Module, state) -> dict[str, int]:
    """Splits the transformer layers of a transformers text encoder over `state.tp_group`, in place.

    Sharded: T5 / UMT5 attention (q, k, v column-parallel by heads, o row-parallel, the relative
    position bias table by heads) and MLPs (wi / wi_0 + wi_1 column, wo row); Qwen2, Qwen2.5-VL
    (language model) and Llama decoder attention (q_proj column by heads, k_proj / v_proj by K/V
    heads or one replicated K/V head per rank, o_proj row) and MLPs (gate_proj + up_proj column,
    down_proj row). A layer whose heads or width do not divide by tp stays whole (e.g. Qwen2.5-VL-7B's
    28 heads at tp 8: attention whole, MLP split). Whole everywhere: token embeddings, lm_head,
    norms, CLIP encoders and the Qwen2.5-VL vision tower.

    Returns counts of what was done: {"attention": n, "mlp": m, "whole": k}.
    """
    tp, rank, group = _group_info(state)
    counts = {"attention": 0, "mlp": 0, "whole": 0}
    if tp == 1:
        return counts
    for sub in list(module.modules()):
        kind = type(sub).__name__
        if kind in T5_ATTENTION:
            done, what = _shard_t5_attention(sub, tp, rank, group), "attention"
        elif kind in T5_MLP:
            ups = ("wi_0", "wi_1") if hasattr(sub, "wi_0") else ("wi",)
            done, what = _shard_mlp(sub, ups, "wo", tp, rank, group), "mlp"
        elif kind in DECODER_ATTENTION:
            done, what = _shard_decoder_attention(sub, tp, rank, group), "attention"
        elif kind in DECODER_MLP:
            done, what = _shard_mlp(sub, ("gate_proj", "up_proj"), "down_proj", tp, rank, group), "mlp"
        else:
            continue
        counts[what if done else "whole"] += 1
    return counts


def text_encoders(pipeline) -> list[nn.Module]:
    """The pipeline's modules holding layers shard_text_encoder knows, found among its attributes
    and one level below (Wan's T5PromptEncoder holds its encoder)."""
    candidates = []
    for value in vars(pipeline).values():
        candidates.append(value)
        if not isinstance(value, (nn.Module, torch.Tensor)) and hasattr(value, "__dict__"):
            candidates += vars(value).values()
    found = []
    for item in candidates:
        is_new = isinstance(item, nn.Module) and all(item is not f for f in found)
        if is_new and any(type(sub).__name__ in SUPPORTED for sub in item.modules()):
            found.append(item)
    return found
