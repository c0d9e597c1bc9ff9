"""FP8 against bf16: one DiT forward with FP8 linears (and FA3-FP8 attention), same full-size config and synthetic weights.

    python bench/fp8_forward.py [--models wan-1.3b,flux.1-dev] [--fast-accum]
    python bench/fp8_forward.py --tiny     (CPU, tiny configs, float32: checks the script itself)

Per model, in one run on one card: diffusers eager bf16, ours bf16 (auto attention), ours with
`--attention-backend fa3-fp8` where the FA3 wheel runs, then the same model with its block linears
quantized (`--quantization fp8`, worker/models/fp8.py), with each attention. Each row: median forward
time (CUDA events, after warm-up), peak memory, the DiT's weight bytes, and the relative error
(||out - ref|| / ||ref||) against a float32 diffusers forward with the same weights and inputs. The
yardstick is `err_vs_bf16`: a variant's error over our bf16 forward's error (FP8 trades precision; how
much more than bf16 already does is the question). `--fast-accum` adds rows with cuBLASLt's fast FP8
accumulation (kernels/fp8.py FAST_ACCUM). The FP8 rows run what `--quantization fp8` runs: the
norms and GELUs that feed FP8 linears write their output quantized (worker/models/layers.py `into=`);
fa3-fp8 quantizes q / k / v per (batch, head) with two Triton kernels each (kernels/fp8.py).

First, `check` rows compare the FP8 kernels with their references at the model's shapes: the Triton
row quantization and per-(batch, head) quantization (bit for bit), torch._scaled_mm against the
dequantized float32 matmul, the fused norm and GELU producers (codes more than one e4m3 step off:
`*_far`; their float32 sums may round one step differently from torch's), and time each kernel
against the passes it replaced (`heads_torch_per_tensor_ms`: the old per-tensor torch chain;
`*_then_quantize_ms`: the norm / GELU kernel followed by quantize_rows).

Prints one JSON line per row, then a table; writes $OUT/<date>-<card>-fp8_forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from common import card, print_table, rel_err, results_name, time_ms, write_json
from dit_forward import CASES, Case, tiny_cases
from diffserve.kernels import activation, fp8, norm
from diffserve.kernels import attention as attn
from diffserve.worker.models.fp8 import quantize_linears
from synthetic import diffusers_model, free_memory, our_model

DEFAULT_MODELS = "wan-1.3b,flux.1-dev"


def weight_gib(model: torch.nn.Module) -> float:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def _far_codes(q: torch.Tensor, ref: torch.Tensor) -> int:
    """e4m3 codes more than one step from the reference's (sign flips included): a kernel whose float32
    math sums in another order than torch (the norms) may land one step off at a rounding boundary."""
    a, b = q.view(torch.uint8).int(), ref.view(torch.uint8).int()
    sign_flip = ((a ^ b) >= 128) & ((a & 127) + (b & 127) > 0)
    return int((sign_flip | ((a & 127) - (b & 127)).abs().gt(1)).sum())


def _per_tensor_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fa3-fp8 quantization before 2026-12 (plain torch, one scale per tensor, ~6 passes), timed as the yardstick."""
    xf = x.float()
    scale = xf.abs().amax().clamp(min=fp8.SCALE_FLOOR) / fp8.FP8_MAX
    return (xf / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8), scale


def kernel_checks(name: str, case: Case, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The FP8 kernels at this model's shapes against their references, and their time against the
    passes they replace: row quantization and torch._scaled_mm at the width-to-width projection;
    quantize_heads at the self-attention's q (against the old per-tensor torch chain); the fused
    norm + modulation and GELU producers (against the norm / GELU followed by quantize_rows)."""
    cfg = case.config
    cuda = device.type == "cuda"
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    dim, ffn = heads * head_dim, cfg.get("ffn_dim", 4 * heads * head_dim)
    tokens = 4096 if cuda else 64
    attn_tokens = attention_tokens(case) if cuda else 64
    g = torch.Generator(device).manual_seed(0)
    x = (torch.randn(tokens, dim, generator=g, device=device) * 3).to(dtype)
    w = (torch.randn(dim, dim, generator=g, device=device) * dim**-0.5).to(dtype)
    q, s = fp8.quantize_rows(x)
    q_ref, s_ref = fp8.quantize_rows_reference(x)
    w_q, w_s = fp8.quantize_rows_reference(w)
    out = fp8.fp8_linear(q, s, w_q, w_s.reshape(1, -1), None, dtype)
    ref = fp8.fp8_linear_reference(q, s, w_q, w_s.reshape(1, -1), None, torch.float32)
    row = dict(model=name, variant="check", quantize_rows="triton" if fp8.use_triton(x) else "reference",
               quantize_mismatches=int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()),
               scale_max_rel_diff=float(((s - s_ref).abs() / s_ref).max()),
               scaled_mm="torch._scaled_mm" if fp8.scaled_mm_runs(device, dtype) else "reference",
               gemm_rel_err=f"{rel_err(out, ref):.2e}", gemm_shape=f"{tokens}x{dim}x{dim}", card=card())

    def ms(fn) -> float:
        return round(time_ms(fn, warmup=3, repeat=20, cuda=cuda), 3)

    # FP8 attention's inputs: one scale per (batch, head), two Triton kernels
    qh = (torch.randn(1, attn_tokens, heads, head_dim, generator=g, device=device) * 2).to(dtype)
    (h8, h_s), (h8_ref, h_s_ref) = fp8.quantize_heads(qh), fp8.quantize_heads_reference(qh)
    row.update(heads_shape=f"1x{attn_tokens}x{heads}x{head_dim}", heads_scales_equal=bool(torch.equal(h_s, h_s_ref)),
               heads_mismatches=int((h8.view(torch.uint8) != h8_ref.view(torch.uint8)).sum()),
               heads_ms=ms(lambda: fp8.quantize_heads(qh)), heads_torch_per_tensor_ms=ms(lambda: _per_tensor_torch(qh)))

    # the producers that write FP8 rows: AdaLN norm (per-token modulation, as Wan2.2's) and GELU at the MLP width
    xt = x[None]  # (1, tokens, dim)
    shift, scale = (torch.randn(2, 1, tokens, dim, generator=g, device=device) * 0.5).unbind(0)
    rows, y = fp8.layer_norm_fp8(xt, eps=1e-6, shift=shift, scale=scale), norm.layer_norm_reference(xt.float(), None, None, 1e-6, shift, scale)
    row.update(norm_fp8_far=_far_codes(rows.data, fp8.quantize_rows_reference(y)[0]),
               norm_fp8_ms=ms(lambda: fp8.layer_norm_fp8(xt, eps=1e-6, shift=shift, scale=scale)),
               norm_then_quantize_ms=ms(lambda: fp8.quantize_rows(norm.layer_norm(xt, eps=1e-6, shift=shift, scale=scale))))
    hidden = (torch.randn(tokens, ffn, generator=g, device=device) * 2).to(dtype)
    rows = fp8.gelu_tanh_fp8(hidden)
    row.update(gelu_shape=f"{tokens}x{ffn}", gelu_fp8_far=_far_codes(rows.data, fp8.quantize_rows_reference(activation.gelu_tanh_reference(hidden.float()))[0]),
               gelu_fp8_ms=ms(lambda: fp8.gelu_tanh_fp8(hidden)),
               gelu_then_quantize_ms=ms(lambda: fp8.quantize_rows(activation.gelu_tanh(hidden))))
    return [row]


def attention_tokens(case: Case) -> int:
    """The case's self-attention length over its image / video tokens."""
    if "latent" in case.shape:
        _, f, h, w = case.shape["latent"]
        return f * h * w // 4  # a (1, 2, 2) patch (Wan, HunyuanVideo)
    return int(torch.tensor(case.shape["grid"]).prod())


def auto_backend(case: Case, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `auto` picks for the case's self-attention over its image / video tokens."""
    cfg = case.config
    tokens = attention_tokens(case)
    return attn.backend_for(torch.empty(1, tokens, cfg["num_attention_heads"], cfg["attention_head_dim"], device=device, dtype=dtype))


def bench_case(name: str, case: Case, device: torch.device, dtype: torch.dtype, fast_accum: bool) -> list[dict]:
    fam, cfg = case.family, case.config
    cuda = device.type == "cuda"
    exact_shape = case.exact_shape or case.shape
    inputs = fam.inputs(cfg, case.shape, device, dtype)
    warmup, repeat = (0, 3) if case.slow else (2, 5)
    head_dim = cfg["attention_head_dim"]
    fp8_attention = attn.cannot_run("fa3-fp8", device, dtype, head_dim) is None
    rows: list[dict] = []

    def timed(call) -> tuple[float, float | None]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = time_ms(lambda: call(inputs), warmup=warmup, repeat=repeat, cuda=cuda)
        return ms, (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)

    def row(variant: str, linears: str, attention: str, ms: float, peak: float | None, weights: float, out: torch.Tensor | None) -> None:
        rows.append(dict(model=name, shape=case.label, variant=variant, linears=linears, attention=attention, ms=round(ms, 1),
                         peak_gib=round(peak, 1) if peak is not None else "", weights_gib=round(weights, 3), out=out, card=card()))

    with torch.no_grad():
        reference = diffusers_model(fam.diffusers_class, cfg, dtype, device)
        ms, peak = timed(lambda i: fam.diffusers_call(reference, i))
        exact_inputs = inputs if exact_shape is case.shape else fam.inputs(cfg, exact_shape, device, dtype)
        row("diffusers eager", str(dtype).removeprefix("torch."), "sdpa", ms, peak, weight_gib(reference),
            fam.diffusers_call(reference, exact_inputs))
        del reference
        free_memory()

        model = our_model(fam.our_class(), fam.diffusers_class, cfg, dtype, device)
        base = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")  # --tiny: float32
        for linears in (base, "fp8"):
            if linears == "fp8":
                counts = quantize_linears(model)
                free_memory()
                print(f"{name}: {counts['fp8']} linears in fp8, {counts['kept']} kept", flush=True)
            runs = [("auto", False)] + ([("fa3-fp8", False)] if fp8_attention else [])
            if linears == "fp8" and fast_accum:
                runs += [(backend, True) for backend, _ in runs]
            for backend, accum in runs:
                attn.configure(backend)
                fp8.FAST_ACCUM = accum
                try:
                    ms, peak = timed(lambda i: fam.ours_call(model, i))
                    used = auto_backend(case, device, dtype) if backend == "auto" else backend
                    variant = linears + (" +fa3-fp8" if backend == "fa3-fp8" else "") + (" fast-accum" if accum else "")
                    row(variant, linears, used, ms, peak, weight_gib(model), fam.ours_call(model, exact_inputs))
                finally:
                    attn.configure("auto")
                    fp8.FAST_ACCUM = False
        del model
        free_memory()

        ref_inputs = {k: v.float() if k in fam.activations else v for k, v in exact_inputs.items()}
        fp32_model = diffusers_model(fam.diffusers_class, cfg, torch.float32, device)
        fp32 = fam.diffusers_call(fp32_model, ref_inputs)
        del fp32_model
        free_memory()

    ours_bf16 = rows[1]  # ours in the model's dtype, auto attention
    diffusers = rows[0]
    bf16_err = rel_err(ours_bf16["out"], fp32)
    for r in rows:
        err = rel_err(r.pop("out"), fp32)
        r.update(rel_err=f"{err:.2e}", err_vs_bf16=round(err / bf16_err, 2) if bf16_err > 0 else "",
                 speedup_vs_bf16=round(ours_bf16["ms"] / r["ms"], 3), speedup_vs_diffusers=round(diffusers["ms"] / r["ms"], 3),
                 exactness=f"fp32 diffusers, {case.exact_label or case.label}")
    return rows


COLUMNS = ["model", "shape", "variant", "attention", "ms", "speedup_vs_bf16", "speedup_vs_diffusers", "rel_err", "err_vs_bf16",
           "peak_gib", "weights_gib", "card"]
CHECK_COLUMNS = ["model", "quantize_rows", "quantize_mismatches", "scale_max_rel_diff", "scaled_mm", "gemm_rel_err", "gemm_shape"]
KERNEL_COLUMNS = ["model", "heads_shape", "heads_scales_equal", "heads_mismatches", "heads_ms", "heads_torch_per_tensor_ms",
                  "norm_fp8_far", "norm_fp8_ms", "norm_then_quantize_ms", "gelu_shape", "gelu_fp8_far", "gelu_fp8_ms",
                  "gelu_then_quantize_ms"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS}); any of {','.join(CASES)}")
    p.add_argument("--fast-accum", action="store_true", help="also time the FP8 variants with cuBLASLt's fast accumulation")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU in float32 (checks the script; timings mean nothing)")
    p.add_argument("--out", default="", help="folder for the JSON (default $OUT, else bench/results; --tiny: a temporary folder)")
    args = p.parse_args(argv)
    cases = tiny_cases() if args.tiny else CASES
    names = args.models.split(",")
    unknown = [n for n in names if n not in cases]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {','.join(cases)}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
        out = args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="fp8-forward-tiny-")
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        out = args.out or None
    checks, rows = [], []
    for name in names:
        started = time.perf_counter()
        checks += kernel_checks(name, cases[name], device, dtype)
        rows += bench_case(name, cases[name], device, dtype, args.fast_accum)
        path = write_json(results_name("fp8_forward"), checks + rows, out)  # after each model, so a later failure keeps these
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    for r in checks + rows:
        print(json.dumps(r))
    print_table(checks, CHECK_COLUMNS)
    print_table(checks, KERNEL_COLUMNS)
    print_table(rows, COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
