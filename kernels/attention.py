"""Attention dispatch for every model in diffserve.

Every DiT calls `attention(q, k, v)`; this module picks the fastest *exact* backend available
for the device, dtype and head dim, logs the choice once per signature, and falls back to plain
PyTorch SDPA (the CPU / CI path, and the reference the others are checked against):

| backend      | needs                                   | notes                                  |
|--------------|-----------------------------------------|----------------------------------------|
| `fa3`        | Hopper (sm90), bf16, head_dim <= 256, `fa3_fwd` wheel | FlashAttention-3 forward          |
| `flash-attn` | CUDA, bf16/fp16, head_dim <= 256, `flash_attn` package | FlashAttention-2                  |
| `cudnn`      | CUDA, bf16/fp16                          | SDPA pinned to the cuDNN kernel        |
| `sdpa`       | anything                                 | PyTorch picks its kernel               |
| `fa3-fp8`    | as `fa3`                                 | FA3 on FP8 q/k/v: an approximation     |

Auto order for long sequences (>= LONG_SEQUENCE keys) is the first four's; shorter calls on CUDA go
to `sdpa`, which measured faster there. `fa3-fp8` is never chosen automatically (auto means exact):
it quantizes q, k and v to float8_e4m3fn with one scale per (batch row, head) (diffserve.kernels.fp8
`quantize_heads`: two light Triton kernels per tensor) and passes the scales to FA3 as its descales
(docs/acceleration.md).

`configure(name)` (the worker's `--attention-backend`) forces one; a forced backend that cannot
run a call is an error, not a silent fallback. Layout everywhere: (batch, seq, heads, head_dim).

`attention_varlen` serves packed requests (mixed-shape batching): sequences of different lengths one
after the other in one (1, sum L, H, D) tensor, each attending to its own keys. With FA3 (auto or
forced `fa3`, where it runs) it is one `flash_attn_varlen_func` call over int32 cumulative lengths;
otherwise one `attention` call per sequence (the reference, and every other backend's path).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffserve.kernels.fp8 import dequantize, quantize_heads
from diffserve.worker.transfer import to_device

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
VarlenFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "SeqLens", "SeqLens"], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], AttentionFn | None]  # None when the library is missing
    supports: Callable[[torch.device, torch.dtype, int], bool]
    needs: str = ""  # what it takes, for the error when a forced backend cannot run


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants the heads before the sequence: (B, H, L, D).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Lq, Dv)
    return out.transpose(1, 2)  # (B, Lq, H, Dv)


def _sdpa_pinned(kernel) -> AttentionFn:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([kernel]):
            return _sdpa(q, k, v)

    return run


def _load_cudnn() -> AttentionFn | None:
    from torch.nn.attention import SDPBackend

    return _sdpa_pinned(SDPBackend.CUDNN_ATTENTION)


def _fa3_interface():
    """The fa3-fwd wheel's interface module, or None where it is not installed."""
    try:
        # The fa3-fwd wheel ships its config module as fa3_fwd_config; its interface imports it
        # under FlashAttention's name.
        sys.modules.setdefault("flash_attn_config", importlib.import_module("fa3_fwd_config"))
        return importlib.import_module("fa3_fwd_interface")
    except ImportError:
        return None


def _load_fa3() -> AttentionFn | None:
    fa3 = _fa3_interface()
    if fa3 is None:
        return None

    def run(q, k, v):
        out = fa3.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return run


def _load_fa3_fp8() -> AttentionFn | None:
    fa3 = _fa3_interface()
    if fa3 is None:
        return None

    def run(q, k, v):
        # q: (B, Lq, H, D), k/v: (B, Lk, H, D) in bf16 -> float8_e4m3fn with one scale per (batch row,
        # head), FA3's descales (shape (batch, kv heads)). FA3 needs only unit stride on D: it transposes
        # FP8 V tiles in shared memory itself (this wheel is built without its column-major-V option),
        # so quantize_heads' contiguous outputs go in as they are. Output: bf16 (B, Lq, H, D).
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"fa3-fp8 takes as many query as key heads (got {q.shape[2]} and {k.shape[2]})")
        (q8, q_scale), (k8, k_scale), (v8, v_scale) = (quantize_heads(t) for t in (q, k, v))
        out = fa3.flash_attn_func(q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(q.dtype)

    return run


def attention_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What `fa3-fp8` computes, in float32 on any device: q, k, v quantized per (batch row, head),
    dequantized with their scales, exact attention, cast to q's dtype. (FA3 also rounds the softmax
    probabilities to FP8 before P @ V; this reference does not.)"""
    dtype = q.dtype
    q, k, v = (dequantize(t8, scale[:, None, :, None]) for t8, scale in (quantize_heads(t) for t in (q, k, v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, Lq, D)
    return out.transpose(1, 2).to(dtype)


def _load_flash_attn() -> AttentionFn | None:
    try:
        flash_attn = importlib.import_module("flash_attn")
    except ImportError:
        return None
    return lambda q, k, v: flash_attn.flash_attn_func(q, k, v)


def _cuda_half(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim <= 256


def _hopper_bf16(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16 and head_dim <= 256 and torch.cuda.get_device_capability(device)[0] == 9


_FA3_NEEDS = "a Hopper GPU (sm90), bf16, head_dim <= 256 and the fa3_fwd wheel (fa3-fwd)"
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa3", _load_fa3, _hopper_bf16, _FA3_NEEDS),
        Backend("flash-attn", _load_flash_attn, _cuda_half, "CUDA, bf16/fp16, head_dim <= 256 and the flash_attn package"),
        Backend("cudnn", _load_cudnn, lambda device, dtype, d: device.type == "cuda" and dtype in (torch.bfloat16, torch.float16),
                "CUDA, bf16/fp16"),
        Backend("sdpa", lambda: _sdpa, lambda device, dtype, d: True),
        Backend("fa3-fp8", _load_fa3_fp8, _hopper_bf16, _FA3_NEEDS + " (its FP8 path)"),
    )
}
AUTO_ORDER = ("fa3", "flash-attn", "cudnn", "sdpa")  # exact backends only: fa3-fp8 runs only when forced
# Below this many keys torch's own SDPA pick beat FA3 on an H100 (FLUX 1024², 4.6k tokens: 0.46 vs
# 0.54 ms; Wan 480p, 32.8k tokens: FA3 9.5 vs 11.4 ms; bench/NOTES.md), so short calls go to sdpa.
LONG_SEQUENCE = 8192

_forced: str | None = None
# (device, dtype, head_dim, long) -> (name, fn). A plain dict, not functools.lru_cache, so that
# torch.compile traces the lookup instead of breaking the graph at every attention call.
_choices: dict[tuple, tuple[str, AttentionFn]] = {}
_varlen_choices: dict[tuple, "VarlenFn | None"] = {}  # (device, dtype, head_dim) -> FA3's varlen call or None (the loop)


def configure(name: str = "auto") -> None:
    """Forces a backend for this process ("auto" restores automatic choice)."""
    global _forced
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; one of auto, {', '.join(BACKENDS)}")
    _forced = None if name == "auto" else name
    _choices.clear()
    _varlen_choices.clear()


_LOADED: dict[str, AttentionFn | None] = {}


def _loaded(name: str) -> AttentionFn | None:
    if name not in _LOADED:
        _LOADED[name] = BACKENDS[name].load()
    return _LOADED[name]


def _choose(device: torch.device, dtype: torch.dtype, head_dim: int, keys: int) -> tuple[str, AttentionFn]:
    key = (device, dtype, head_dim, keys >= LONG_SEQUENCE)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _pick(device, dtype, head_dim, keys >= LONG_SEQUENCE)
    return choice


def prepare(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> None:
    """Chooses (and loads) the backend for this signature, short and long sequences, ahead of time.

    Call it before torch.compile traces a model: the trace then only reads the dispatch caches. A
    cache entry added during the first compiled call fails that graph's guards, and the second call
    recompiles the whole model (minutes for FLUX on a GPU; `compile_dits` calls this).
    """
    for keys in (0, LONG_SEQUENCE):
        _choose(torch.device(device), dtype, head_dim, keys)


def _pick(device: torch.device, dtype: torch.dtype, head_dim: int, long: bool) -> tuple[str, AttentionFn]:
    candidates = (_forced,) if _forced else (AUTO_ORDER if long or device.type != "cuda" else ("sdpa",))
    for name in candidates:
        backend = BACKENDS[name]
        if backend.supports(device, dtype, head_dim) and (fn := _loaded(name)) is not None:
            if not torch.compiler.is_compiling():  # a logging call would break a torch.compile graph
                log.info("attention backend %s for %s %s head_dim %d, %s sequences", name, device, str(dtype).removeprefix("torch."),
                         head_dim, "long" if long else "short")
            return name, fn
    raise RuntimeError(cannot_run(_forced, device, dtype, head_dim) if _forced else f"no attention backend runs on {device} {dtype}")


def cannot_run(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why backend `name` cannot run this signature here (not installed, or the device / dtype / head
    dim does not suit it), or None when it can. The worker checks a forced backend with it at start."""
    backend = BACKENDS[name]
    if backend.supports(device, dtype, head_dim) and _loaded(name) is not None:
        return None
    needs = f": it needs {backend.needs}" if backend.needs else ""
    return f"attention backend {name} cannot run on {device} {str(dtype).removeprefix('torch.')} head_dim {head_dim}{needs}"


def backend_for(q: torch.Tensor) -> str:
    """The backend `attention` uses for tensors like q."""
    return _choose(q.device, q.dtype, q.shape[-1], q.shape[1])[0]


def available(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Backends installed here that can run this signature, fastest first."""
    return [n for n in AUTO_ORDER if BACKENDS[n].supports(device, dtype, head_dim) and _loaded(n) is not None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention with the default 1/sqrt(head_dim) scale.

    q: (B, Lq, H, D), k: (B, Lk, H, D), v: (B, Lk, H, Dv) -> (B, Lq, H, Dv)
    key_mask: optional bool (B, Lk), False for padding keys (batched variable-length text). Masked
    calls run through SDPA today; a varlen FlashAttention path is future work.
    """
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    return _choose(q.device, q.dtype, q.shape[-1], k.shape[1])[1](q, k, v)


def run_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One call through a named backend (benchmarks and checks)."""
    problem = cannot_run(name, q.device, q.dtype, q.shape[-1])
    if problem:
        raise RuntimeError(problem)
    return _loaded(name)(q, k, v)


# ---------------------------------------------------------------------------------------------
# Attention with its log-sum-exp (Ring attention merges partial results by it)
# ---------------------------------------------------------------------------------------------


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `attention`, also returning each row's log-sum-exp of the scaled scores.

    q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> out (B, Lq, H, D) in q's dtype, lse (B, Lq, H) float32.
    Rows whose keys are all masked get out 0 and lse -inf. On CUDA half precision without a mask:
    FA3 when loaded (it returns the log-sum-exp), else PyTorch's memory-efficient kernel; anything
    else (CPU, masks) runs the float32 math below in query chunks.
    """
    if key_mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if _forced in (None, "fa3") and _hopper_bf16(q.device, q.dtype, q.shape[-1]) and _loaded("fa3") is not None:
            return _fa3_lse(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)[:2]
        return out.transpose(1, 2), lse[..., : q.shape[1]].transpose(1, 2).float()
    return _math_lse(q, k, v, key_mask)


def _fa3_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fa3 = importlib.import_module("fa3_fwd_interface")
    out, lse = fa3.flash_attn_func(q, k, v, return_attn_probs=True)[:2]  # lse: (B, H, Lq)
    return out, lse.transpose(1, 2).float()


def _math_lse(q, k, v, key_mask, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    kt = k.float().permute(0, 2, 3, 1)  # (B, H, D, Lk)
    vt = v.float().transpose(1, 2)  # (B, H, Lk, D)
    outs, lses = [], []
    for start in range(0, q.shape[1], chunk):
        scores = torch.matmul(q[:, start : start + chunk].float().transpose(1, 2), kt) * scale  # (B, H, c, Lk)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, c)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # all-masked rows: 0
        outs.append(torch.matmul(probs, vt).transpose(1, 2))  # (B, c, H, D)
        lses.append(lse.transpose(1, 2))  # (B, c, H)
    return torch.cat(outs, dim=1).to(q.dtype), torch.cat(lses, dim=1)


# ---------------------------------------------------------------------------------------------
# Packed sequences of different lengths (mixed-shape batching)
# ---------------------------------------------------------------------------------------------


class SeqLens:
    """The lengths of sequences packed one after the other, and their int32 cumulative offsets
    (`cu_seqlens`: 0, L0, L0 + L1, ..., a varlen kernel's input) per device, built on the host and
    copied without waiting for the device the first time a device asks, then reused: a packed
    forward builds one per sequence layout and every layer's call reads it."""

    def __init__(self, lengths: tuple[int, ...] | list[int]):
        self.lengths = tuple(int(n) for n in lengths)
        assert self.lengths and min(self.lengths) > 0, f"lengths must be positive, got {self.lengths}"
        self.max = max(self.lengths)
        self.total = sum(self.lengths)
        self._offsets: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return f"SeqLens({self.lengths})"

    def offsets(self, device: torch.device) -> torch.Tensor:
        """(len + 1,) int32 on `device`: where each sequence starts, then the total."""
        cu = self._offsets.get(device)
        if cu is None:
            starts = [0]
            for n in self.lengths:
                starts.append(starts[-1] + n)
            cu = self._offsets[device] = to_device(starts, device, torch.int32)
        return cu


def _lens(lens: SeqLens | tuple[int, ...] | list[int]) -> SeqLens:
    return lens if isinstance(lens, SeqLens) else SeqLens(lens)


def _load_fa3_varlen() -> VarlenFn | None:
    fa3 = _fa3_interface()
    if fa3 is None:
        return None

    def run(q, k, v, q_lens: SeqLens, k_lens: SeqLens):
        # FA3 takes the packed tokens without the batch dim: (total, H, D); out (total_q, H, Dv).
        out = fa3.flash_attn_varlen_func(q[0], k[0], v[0], q_lens.offsets(q.device), k_lens.offsets(q.device),
                                         q_lens.max, k_lens.max)
        out = out[0] if isinstance(out, tuple) else out
        return out[None]

    return run


def _varlen_fn(q: torch.Tensor) -> VarlenFn | None:
    """FA3's varlen kernel where `attention` would run FA3 (auto or forced `fa3`, on a device, dtype
    and head dim it supports, the wheel installed), else None (the per-sequence loop). Decided once
    per signature, like `attention`'s backend (configure() forgets it)."""
    key = ("varlen", q.device, q.dtype, q.shape[-1])
    if key not in _varlen_choices:
        fn = None
        if _forced in (None, "fa3") and _hopper_bf16(q.device, q.dtype, q.shape[-1]):
            if "fa3-varlen" not in _LOADED:
                _LOADED["fa3-varlen"] = _load_fa3_varlen()
            fn = _LOADED["fa3-varlen"]
        _varlen_choices[key] = fn
    return _varlen_choices[key]


def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: SeqLens | tuple[int, ...], k_lens: SeqLens | tuple[int, ...]
) -> torch.Tensor:
    """Packed sequences, each attending only to its own keys (non-causal, 1/sqrt(head_dim) scale).

    q: (1, sum q_lens, H, D); k: (1, sum k_lens, H, D), v: (1, sum k_lens, H, Dv); sequence i's
    queries are rows [sum q_lens[:i], sum q_lens[:i + 1]) of q and its keys the same span of k_lens
    in k / v. -> (1, sum q_lens, H, Dv), equal to `attention` run on each sequence alone. Pass SeqLens
    built once per forward (their device offsets are reused); plain tuples are wrapped per call.
    """
    q_lens, k_lens = _lens(q_lens), _lens(k_lens)
    assert q.shape[0] == k.shape[0] == v.shape[0] == 1, "packed sequences come as one batch row"
    assert len(q_lens) == len(k_lens), f"{len(q_lens)} query sequences, {len(k_lens)} key sequences"
    assert q.shape[1] == q_lens.total and k.shape[1] == v.shape[1] == k_lens.total, (
        f"q {tuple(q.shape)}, k {tuple(k.shape)} do not hold {q_lens.total} queries and {k_lens.total} keys")
    fn = _varlen_fn(q)
    if fn is not None:
        return fn(q, k, v, q_lens, k_lens)
    if len(q_lens) == 1:
        return attention(q, k, v)
    pairs = zip(q.split(q_lens.lengths, dim=1), k.split(k_lens.lengths, dim=1), v.split(k_lens.lengths, dim=1))
    return torch.cat([attention(qi, ki, vi) for qi, ki, vi in pairs], dim=1)
