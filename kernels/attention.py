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

Auto order for long sequences (>= LONG_SEQUENCE keys) is the table's; shorter calls on CUDA go
to `sdpa`, which measured faster there.

`configure(name)` (the worker's `--attention-backend`) forces one; a forced backend that cannot
run a call is an error, not a silent fallback. Layout everywhere: (batch, seq, heads, head_dim).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], AttentionFn | None]  # None when the library is missing
    supports: Callable[[torch.device, torch.dtype, int], bool]


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


def _load_fa3() -> AttentionFn | None:
    try:
        # The fa3-fwd wheel ships its config module as fa3_fwd_config; its interface imports it
        # under FlashAttention's name.
        sys.modules.setdefault("flash_attn_config", importlib.import_module("fa3_fwd_config"))
        fa3 = importlib.import_module("fa3_fwd_interface")
    except ImportError:
        return None

    def run(q, k, v):
        out = fa3.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return run


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


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa3", _load_fa3, _hopper_bf16),
        Backend("flash-attn", _load_flash_attn, _cuda_half),
        Backend("cudnn", _load_cudnn, lambda device, dtype, d: device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)),
        Backend("sdpa", lambda: _sdpa, lambda device, dtype, d: True),
    )
}
AUTO_ORDER = ("fa3", "flash-attn", "cudnn", "sdpa")
# Below this many keys torch's own SDPA pick beat FA3 on an H100 (FLUX 1024², 4.6k tokens: 0.46 vs
# 0.54 ms; Wan 480p, 32.8k tokens: FA3 9.5 vs 11.4 ms; bench/NOTES.md), so short calls go to sdpa.
LONG_SEQUENCE = 8192

_forced: str | None = None
# (device, dtype, head_dim, long) -> (name, fn). A plain dict, not functools.lru_cache, so that
# torch.compile traces the lookup instead of breaking the graph at every attention call.
_choices: dict[tuple, tuple[str, AttentionFn]] = {}


def configure(name: str = "auto") -> None:
    """Forces a backend for this process ("auto" restores automatic choice)."""
    global _forced
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; one of auto, {', '.join(BACKENDS)}")
    _forced = None if name == "auto" else name
    _choices.clear()


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
    raise RuntimeError(f"attention backend {_forced!r} cannot run on {device} {dtype} head_dim {head_dim} (or is not installed)")


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
    fn = _loaded(name)
    if fn is None or not BACKENDS[name].supports(q.device, q.dtype, q.shape[-1]):
        raise RuntimeError(f"attention backend {name} cannot run here")
    return fn(q, k, v)


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
