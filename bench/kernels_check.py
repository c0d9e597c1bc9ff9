"""Each fused Triton op against its torch reference at the models' shapes: accuracy and speed.

python bench/kernels_check.py              (GPU; writes $OUT/kernels_check.json)
python bench/kernels_check.py --tiny       (any machine: tiny shapes, checks the cases and arguments;
                                            runs the Triton launchers too under TRITON_INTERPRET=1)

Per op and shape: max abs error Triton vs reference with float32 inputs; with bf16 inputs, the max
abs error of each (Triton, reference) against the float32 reference on the same (bf16-valued)
inputs; whether the public dispatch function ran the Triton kernel; median CUDA-event time of
both in bf16 and float32, and the Triton kernel's bandwidth in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable

import torch

from common import card, print_table, time_ms, write_json
from diffserve.kernels import activation, norm, residual, rope, timestep
from diffserve.worker.models.rope import rotary_tables

EPS = 1e-6
SHAPES = {  # from ../shared/GPU.md; B = 1
    "wan-1.3b-480p": dict(tokens=32760, dim=1536, heads=12, head_dim=128, ffn=8960, wan=True),
    "flux-1024": dict(tokens=4608, dim=3072, heads=24, head_dim=128, ffn=12288, wan=False),
    "tiny": dict(tokens=6, dim=48, heads=3, head_dim=16, ffn=96, wan=True),  # --tiny only
}


@dataclasses.dataclass
class Case:
    """One op at one shape: `make(dtype)` builds the arguments (activations in dtype, float32
    modulation / tables / weights where the models keep them float32); the three callables take them."""

    op: str
    make: Callable[[torch.dtype], tuple]
    triton: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    dispatch: Callable[..., torch.Tensor]


def cases(s: dict, device: str) -> list[Case]:
    t, d, h, dh, ffn = s["tokens"], s["dim"], s["heads"], s["head_dim"], s["ffn"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=gen, device=device) * scale + offset

    x_base = rand(1, t, d, scale=2.0, offset=1.0)  # residual stream (B, L, D)
    mod_table = rand(1, t, 6, d, scale=0.5)  # per-token modulation (Wan2.2 TI2V), float32
    shift_b, scale_b, gate_b = rand(1, 1, d, scale=0.5), rand(1, 1, d, scale=0.5), rand(1, 1, d, scale=0.5)
    y_base = rand(1, t, d)
    w_norm, w_head, w_all = rand(d, scale=0.1, offset=1.0), rand(dh, scale=0.1, offset=1.0), rand(h * dh, scale=0.1, offset=1.0)
    q_base = rand(1, t, h, dh, scale=3.0)
    cos, sin = (tab[None, :, None].to(device) for tab in rotary_tables(dh, t))  # (1, L, 1, Dh) float32
    ff_base, ff_bias = rand(1, t, ffn, scale=2.0), rand(ffn, scale=0.1)
    steps = torch.rand(1, t, generator=gen, device=device) * 1000  # per-token timesteps
    w_ff, b_ff = rand(ffn, d, scale=d ** -0.5), rand(ffn, scale=0.1)  # the MLP's first linear

    def ff_args(dt):
        return y_base.to(dt), w_ff.to(dt), b_ff.to(dt)

    def epilogue(x, w, b):  # what linear_gelu_tanh runs on CUDA: bias + GELU in the GEMM's epilogue
        return torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True).view(*x.shape[:-1], w.shape[0])

    def linear_then_gelu(x, w, b):
        return activation.gelu_tanh_reference(torch.nn.functional.linear(x, w, b))

    def per_token(i):
        return mod_table.unbind(2)[i]  # a strided view, as the models slice it

    # Packed requests (mixed-shape batching): 4 requests' rows (4, 1, 6, D), each token's row by index.
    packed_table = rand(4, 1, 6, d, scale=0.5)
    index = (torch.arange(t, device=device) * 4 // t).to(torch.int32)  # (L,): 4 spans of tokens

    def packed(i):
        return packed_table.unbind(2)[i]  # (4, 1, D), strided

    out = [
        Case("layer_norm+mod (B,1,D)", lambda dt: (x_base.to(dt), shift_b, scale_b),
             lambda x, sh, sc: norm.norm_triton(x, None, None, EPS, sh, sc, rms=False),
             lambda x, sh, sc: norm.layer_norm_reference(x, None, None, EPS, sh, sc),
             lambda x, sh, sc: norm.layer_norm(x, eps=EPS, shift=sh, scale=sc)),
        Case("layer_norm+mod (B,L,D)", lambda dt: (x_base.to(dt), per_token(0), per_token(1)),
             lambda x, sh, sc: norm.norm_triton(x, None, None, EPS, sh, sc, rms=False),
             lambda x, sh, sc: norm.layer_norm_reference(x, None, None, EPS, sh, sc),
             lambda x, sh, sc: norm.layer_norm(x, eps=EPS, shift=sh, scale=sc)),
        Case("layer_norm+mod indexed (R,1,D)", lambda dt: (x_base.to(dt), packed(0), packed(1), index),
             lambda x, sh, sc, i: norm.norm_triton(x, None, None, EPS, sh, sc, rms=False, index=i),
             lambda x, sh, sc, i: norm.layer_norm_reference(x, None, None, EPS, sh, sc, i),
             lambda x, sh, sc, i: norm.layer_norm(x, eps=EPS, shift=sh, scale=sc, index=i)),
        Case("layer_norm affine", lambda dt: (x_base.to(dt), w_norm, shift_b[0, 0]),
             lambda x, w, b: norm.norm_triton(x, w, b, EPS, None, None, rms=False),
             lambda x, w, b: norm.layer_norm_reference(x, w, b, EPS),
             lambda x, w, b: norm.layer_norm(x, w, b, EPS)),
        Case("rms_norm+mod (B,1,D)", lambda dt: (x_base.to(dt), w_norm, shift_b, scale_b),
             lambda x, w, sh, sc: norm.norm_triton(x, w, None, EPS, sh, sc, rms=True),
             lambda x, w, sh, sc: norm.rms_norm_reference(x, w, EPS, sh, sc),
             lambda x, w, sh, sc: norm.rms_norm(x, w, EPS, sh, sc)),
        Case("gated_residual (B,1,D)", lambda dt: (x_base.to(dt), y_base.to(dt), gate_b),
             residual.gated_residual_triton, residual.gated_residual_reference, residual.gated_residual),
        Case("gated_residual (B,L,D)", lambda dt: (x_base.to(dt), y_base.to(dt), per_token(2)),
             residual.gated_residual_triton, residual.gated_residual_reference, residual.gated_residual),
        Case("gated_residual indexed (R,1,D)", lambda dt: (x_base.to(dt), y_base.to(dt), packed(2), index),
             residual.gated_residual_triton, residual.gated_residual_reference, residual.gated_residual),
        Case("apply_rotary", lambda dt: (q_base.to(dt), cos, sin),
             lambda q, c, s_: rope.rms_norm_rope_triton(q, None, 0.0, c, s_, False, norm=False),
             rope.apply_rotary_reference, rope.apply_rotary),
        Case("rms_norm_rope per head", lambda dt: (q_base.to(dt), w_head.to(dt), cos, sin),
             lambda q, w, c, s_: rope.rms_norm_rope_triton(q, w, EPS, c, s_, False),
             lambda q, w, c, s_: rope.rms_norm_rope_reference(q, w, EPS, c, s_),
             lambda q, w, c, s_: rope.rms_norm_rope(q, w, EPS, c, s_)),
        Case("rms_norm_rope across heads", lambda dt: (q_base.to(dt), w_all.to(dt), cos, sin),
             lambda q, w, c, s_: rope.rms_norm_rope_triton(q, w, EPS, c, s_, True),
             lambda q, w, c, s_: rope.rms_norm_rope_reference(q, w, EPS, c, s_, True),
             lambda q, w, c, s_: rope.rms_norm_rope(q, w, EPS, c, s_, True)),
        Case("gelu_tanh", lambda dt: (ff_base.to(dt),),
             activation.gelu_tanh_triton, activation.gelu_tanh_reference, activation.gelu_tanh),
        Case("gelu_tanh + bias", lambda dt: (ff_base.to(dt), ff_bias.to(dt)),
             activation.gelu_tanh_triton, activation.gelu_tanh_reference, activation.gelu_tanh),
        # The "triton" column of these two is the fused path: cuBLASLt's epilogue, or linear + our GELU kernel.
        Case("linear+gelu_tanh epilogue", ff_args, epilogue, linear_then_gelu, activation.linear_gelu_tanh),
        Case("linear, gelu_tanh kernel", ff_args, lambda x, w, b: activation.gelu_tanh_triton(torch.nn.functional.linear(x, w, b)),
             linear_then_gelu, lambda x, w, b: activation.gelu_tanh(torch.nn.functional.linear(x, w, b))),
        Case("timestep_embedding (B,L)x256", lambda dt: (steps.to(dt),),
             lambda ts: timestep.timestep_embedding_triton(ts, 256),
             lambda ts: timestep.timestep_embedding_reference(ts, 256),
             lambda ts: timestep.timestep_embedding(ts, 256)),
    ]
    # Per-token modulation and timesteps (Wan2.2 TI2V) and the q/k norm across heads are Wan's;
    # the per-head q/k norm is FLUX's. The tiny shape runs every case.
    wan_only = {"layer_norm+mod (B,L,D)", "gated_residual (B,L,D)", "rms_norm_rope across heads", "timestep_embedding (B,L)x256"}
    flux_only = {"rms_norm_rope per head"}
    if device == "cpu":  # CPU's _addmm_activation applies the exact (erf) GELU: the epilogue is a CUDA path only
        out = [c for c in out if "epilogue" not in c.op]
    if s is SHAPES["tiny"]:
        return out
    return [c for c in out if c.op not in (flux_only if s["wan"] else wan_only)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def nbytes(tensors) -> int:
    """Bytes a single pass reads or writes: each tensor's own elements (a broadcast one counts once)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_case(case: Case, shape: str, timed: bool, run_triton: bool, repeat: int) -> dict:
    row = dict(shape=shape, op=case.op)
    args32 = case.make(torch.float32)
    ref32 = case.reference(*args32)
    args16 = case.make(torch.bfloat16)
    # float32 math on the very values the bf16 run sees: what both bf16 paths are measured against
    truth16 = case.reference(*(a.float() if a.is_floating_point() else a for a in args16))
    ref16 = case.reference(*args16)
    row["bf16_err_ref"] = f"{max_err(ref16, truth16):.2e}"
    if run_triton:
        tri32 = case.triton(*args32)
        tri16 = case.triton(*args16)
        assert tri32.shape == ref32.shape and tri32.dtype == ref32.dtype, (tri32.shape, ref32.shape, tri32.dtype, ref32.dtype)
        assert tri16.shape == ref16.shape and tri16.dtype == ref16.dtype, (tri16.shape, ref16.shape, tri16.dtype, ref16.dtype)
        row["fp32_err"] = f"{max_err(tri32, ref32):.2e}"
        row["bf16_err_triton"] = f"{max_err(tri16, truth16):.2e}"
        if tri16.is_cuda:  # the public function takes the Triton path (same kernel, so the same bits)
            row["dispatch"] = "triton" if torch.equal(case.dispatch(*args16), tri16) else "REFERENCE"
    if timed:
        for dt, args in (("bf16", args16), ("fp32", args32)):
            ms_ref = time_ms(lambda: case.reference(*args), warmup=3, repeat=repeat)
            row[f"ms_ref_{dt}"] = round(ms_ref, 4)
            if run_triton:
                ms_tri = time_ms(lambda: case.triton(*args), warmup=3, repeat=repeat)
                row[f"ms_triton_{dt}"] = round(ms_tri, 4)
                row[f"speedup_{dt}"] = round(ms_ref / ms_tri, 2)
                if dt == "bf16":
                    row["triton_GB/s_bf16"] = round((nbytes(args) + nbytes([tri16])) / ms_tri / 1e6, 0)
    return row


COLUMNS = ["shape", "op", "fp32_err", "bf16_err_triton", "bf16_err_ref", "dispatch", "ms_ref_bf16", "ms_triton_bf16",
           "speedup_bf16", "triton_GB/s_bf16", "ms_ref_fp32", "ms_triton_fp32", "speedup_fp32"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="wan-1.3b-480p,flux-1024", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--ops", default="", help="only ops whose name contains one of these comma-separated words")
    parser.add_argument("--repeat", type=int, default=20, help="timed repeats per measurement (median)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, no timing: checks the cases on any device")
    args = parser.parse_args(argv)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; one of {', '.join(SHAPES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    words = [w for w in args.ops.split(",") if w]

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("kernels_check needs a CUDA device (or --tiny for a CPU run of the cases)")
    if cuda and norm.triton is None:
        raise SystemExit("triton is not importable: nothing to check")
    device = "cuda" if cuda else "cpu"
    # On CPU only triton's interpreter can run the kernels.
    run_triton = norm.triton is not None and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    torch.manual_seed(0)

    rows = []
    with torch.no_grad():
        for shape in shapes:
            for case in cases(SHAPES[shape], device):
                if words and not any(w in case.op for w in words):
                    continue
                rows.append(run_case(case, shape, timed=cuda, run_triton=run_triton, repeat=args.repeat))
                if cuda:
                    rows[-1]["card"] = card()
            if cuda:
                torch.cuda.empty_cache()
    if cuda:
        write_json("kernels_check.json", rows)
    print_table(rows, [c for c in COLUMNS if any(c in r for r in rows)])


if __name__ == "__main__":
    main()
