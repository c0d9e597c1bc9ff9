"""FP8 linears for a loaded DiT (`--quantization fp8`): module surgery applied from outside the models.

After loading, each eligible nn.Linear of the transformer blocks is replaced by an `FP8Linear`
holding its weight as float8_e4m3fn with one float32 scale per output channel; at run time each
token's activation row is quantized with its own scale and the product runs as one FP8 GEMM
(diffserve.kernels.fp8). Where the input comes out of a norm or a GELU, the producing kernel writes
it already quantized (`FP8Rows`; worker/models/layers.py `into=`, the one seam in the models), so
the linear skips its own quantization pass, and linears that read one input (q / k / v) share it.
Weights are quantized one layer at a time, so loading needs the model's
bf16 weights plus one layer; the blocks' linear weights then take half the memory.

Which linears (docs/decisions.md, "FP8 linears"): those inside the block lists (`blocks`,
`transformer_blocks`, `single_transformer_blocks`), which hold nearly all of a forward's GEMM FLOPs:
attention projections, MLPs, FLUX's and HunyuanVideo's single-stream projections. Kept in the
model's precision:
- everything outside the blocks: patch / text / time / guidance embedders, HunyuanVideo's token
  refiner, the output norm and projection (they run once per forward, on few features, and the last
  one writes the prediction itself);
- AdaLN modulation linears inside blocks (`norm*.linear`, Qwen-Image's `img_mod` / `txt_mod`): they
  act on one timestep vector per sample (no GEMM time to win) and their output scales, shifts and
  gates every token of the block;
- linears whose in or out features are not multiples of 16 (cuBLASLt's FP8 GEMM needs them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffserve.kernels.fp8 import FP8Rows, fp8_linear, quantize_rows, quantize_rows_reference

METHODS = ("none", "fp8")  # the worker's --quantization choices
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks")


class FP8Linear(nn.Module):
    """A linear layer with an FP8 weight: W8A8, row-wise scales, dynamic per-token activation scales.

    Owns `weight` (out, in) float8_e4m3fn, `weight_scale` (1, out) float32 (the weight's row i is
    weight[i] * weight_scale[0, i]) and `bias` (out,) in the model's dtype or None. Input and
    output dtype are the activation's (bf16 on the GPU, float32 on the CPU); the input may come
    quantized already (`FP8Rows`, its `dtype` the output's).
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        assert weight.dtype == torch.float8_e4m3fn and weight_scale.shape == (1, weight.shape[0]), (weight.dtype, weight_scale.shape)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantizes `linear`'s weight per output channel (float32 math, once at load)."""
        q, scale = quantize_rows_reference(linear.weight.detach())  # (out, in), (out, 1)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(q, scale.reshape(1, -1).contiguous(), bias)

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        # (N..., in) -> (N..., out): each of the N tokens quantized with its own scale, here or (FP8Rows)
        # by the kernel that produced x
        if isinstance(x, FP8Rows):
            x_q, x_scale = x.data.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
        else:
            x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # (M, in) float8, (M, 1)
        y = fp8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, x.dtype)  # (M, out)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3 row-wise"


def keeps_precision(name: str, linear: nn.Linear) -> str | None:
    """Why the linear at `name` (dotted, from the DiT's root) stays in the model's precision, or None
    if it is quantized (the rule of this module's docstring)."""
    parts = name.split(".")
    if parts[0] not in BLOCK_LISTS:
        return "outside the transformer blocks"
    if any(p.startswith("norm") or p.endswith("_mod") for p in parts[2:-1]):
        return "AdaLN modulation"
    if linear.in_features % 16 or linear.out_features % 16:
        return "features not a multiple of 16"
    return None


def quantize_linears(model: nn.Module) -> dict[str, int]:
    """Replaces the eligible nn.Linear modules of one DiT by FP8Linear, in place. Returns counts:
    {"fp8": n, "kept": m}. Only exact nn.Linear instances are touched (not tensor-parallel shards)."""
    counts = {"fp8": 0, "kept": 0}
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        if keeps_precision(name, linear) is not None:
            counts["kept"] += 1
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FP8Linear.from_linear(linear))  # the old weight is freed here, one layer at a time
        counts["fp8"] += 1
    return counts


def quantize_pipeline(pipeline, method: str) -> str:
    """Applies `--quantization` to every DiT of a loaded pipeline and records it in
    `pipeline.quantizations` (the card's `quantizations`). Returns a line for the log."""
    from diffserve.worker.models import dits

    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; one of {', '.join(METHODS)}")
    if method == "none":
        return "none"
    parts = []
    for model in dits(pipeline):
        counts = quantize_linears(model)
        parts.append(f"{type(model).__name__}: {counts['fp8']} linears fp8, {counts['kept']} kept")
    pipeline.quantizations = (*getattr(pipeline, "quantizations", ()), method)
    return "; ".join(parts)
