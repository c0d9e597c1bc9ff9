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

`shard_dit` knows our Wan, FLUX, Qwen-Image and HunyuanVideo DiTs; `shard_text_encoder` the transformers T5 /
UMT5 encoders and Qwen2 / Qwen2.5-VL / Llama decoder layers (see its docstring for what stays
whole). Parameters are replaced by copies of their slices, so the full weights are freed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def column_parallel(linear: nn.Linear, ranges: Ranges) -> nn.Linear:
    """Keeps only the output features in `ranges` (weight rows and bias), in place."""
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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, requires_grad: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=requires_grad) if bias is not None else None
        self.out_features, self.in_features = weight.shape
        self.group = group

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranges: Ranges, group) -> RowParallelLinear:
        bias = linear.bias.data if linear.bias is not None else None
        return cls(_take(linear.weight.data, 1, ranges), bias, group, linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (N..., out) partial sum over this rank's input features
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, bias={self.bias is not None}"


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a feature dim split across the tp group (Wan's q/k norm across all heads).

    Keeps this rank's slice of the weight; the mean of squares is the all-reduced sum of the local
    squares over the full width. Same arithmetic as torch's RMSNorm: float32 inside, weight
    applied before casting back. `spans_ranks` tells layers.qk_norm_rope to call it rather than
    run the fused single-rank kernel on its weight.
    """

    spans_ranks = True

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
    """Our DiT attentions (WanAttention, FluxAttention, JointAttention): heads split, outputs row-parallel."""
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


def _shard_flux_single(block: nn.Module, tp: int, rank: int, group) -> None:
    """proj_out reads cat([attn, mlp]); its shard takes this rank's columns of both parts, in that order."""
    inner, mlp = block.attn.to_q.out_features, block.proj_mlp.out_features
    column_parallel(block.proj_mlp, [_share(mlp, tp, rank)])
    _shard_attention(block.attn, tp, rank, group)
    block.proj_out = RowParallelLinear.from_linear(block.proj_out, [_share(inner, tp, rank), _share(mlp, tp, rank, inner)], group)


def _dit_kinds():
    from diffserve.worker.models.flux import FluxTransformer
    from diffserve.worker.models.hunyuan_video import HunyuanVideoTransformer
    from diffserve.worker.models.qwen_image import QwenImageTransformer
    from diffserve.worker.models.wan import WanTransformer

    return WanTransformer, FluxTransformer, QwenImageTransformer, HunyuanVideoTransformer


def _mlp_widths(model: nn.Module) -> set[int]:
    wan, _, _, hunyuan = _dit_kinds()
    if isinstance(model, wan):
        return {model.config.ffn_dim}
    if isinstance(model, hunyuan):  # the blocks' MLPs and the token refiner's (ratio 4)
        return {int(model.config.inner_dim * model.config.mlp_ratio), 4 * model.config.inner_dim}
    return {4 * model.config.inner_dim}


def dit_problems(models: list[nn.Module], tp: int) -> list[str]:
    """Why these DiTs cannot be split over `tp` ranks (empty when they can). Heads are checked by
    ParallelDims.head_problems; this checks the model kind and the MLP widths."""
    if tp == 1:
        return []
    out = []
    for m in models:
        if not isinstance(m, _dit_kinds()):
            out.append(f"{type(m).__name__} has no tensor-parallel path; use --tp-size 1")
            continue
        out += [f"MLP width {w} does not divide by tp {tp}" for w in sorted(_mlp_widths(m)) if w % tp]
    return out


def shard_dit(model: nn.Module, state) -> nn.Module:
    """Splits a Wan, FLUX, Qwen-Image or HunyuanVideo DiT over `state.tp_group`, in place; returns it.

    Sharded: every attention's Q/K/V (image and text streams, Wan I2V's image K/V) column-parallel
    by heads, its output projections row-parallel; every MLP (image and text streams) column /
    row-parallel; FLUX / HunyuanVideo single blocks' proj_mlp and the fused proj_out; HunyuanVideo's
    token refiner blocks (attention and SiLU MLP); Wan's q/k norms across heads become
    ParallelRMSNorm. Replicated: patch/text/time embedders, modulation, norms over the model width,
    the output head.
    """
    tp, rank, group = _group_info(state)
    if tp == 1:
        return model
    wan, flux, _, hunyuan = _dit_kinds()
    problems = dit_problems([model], tp)
    if problems:
        raise ValueError("; ".join(problems))
    if isinstance(model, wan):
        for block in model.blocks:
            _shard_attention(block.attn1, tp, rank, group, ("norm_q", "norm_k"))
            _shard_attention(block.attn2, tp, rank, group, ("norm_q", "norm_k", "norm_added_k"))
            _shard_feed_forward(block.ffn, tp, rank, group)
    elif isinstance(model, (flux, hunyuan)):  # HunyuanVideo: FLUX's dual / single block layout + a token refiner
        if isinstance(model, hunyuan):
            for block in model.context_embedder.token_refiner.refiner_blocks:
                _shard_attention(block.attn, tp, rank, group)
                _shard_feed_forward(block.ff, tp, rank, group)
        for block in model.transformer_blocks:
            _shard_attention(block.attn, tp, rank, group)  # per-head q/k norms: local as they are
            _shard_feed_forward(block.ff, tp, rank, group)
            _shard_feed_forward(block.ff_context, tp, rank, group)
        for block in model.single_transformer_blocks:
            _shard_flux_single(block, tp, rank, group)
    else:
        for block in model.transformer_blocks:
            _shard_attention(block.attn, tp, rank, group)
            _shard_feed_forward(block.img_mlp, tp, rank, group)
            _shard_feed_forward(block.txt_mlp, tp, rank, group)
    return model


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


def shard_pipeline(pipeline, state) -> str:
    """Shards every DiT and every supported text encoder of a loaded pipeline; returns a summary to log."""
    from diffserve.worker.warmup import dits

    models = dits(pipeline)
    for model in models:
        shard_dit(model, state)
    parts = [f"{len(models)} DiT(s)"]
    for encoder in text_encoders(pipeline):
        counts = shard_text_encoder(encoder, state)
        parts.append(f"{type(encoder).__name__} ({counts['attention']} attention, {counts['mlp']} MLP split, {counts['whole']} whole)")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the freed full weights back
    return f"tensor parallel over {state.dims.tp} ranks: " + ", ".join(parts)
