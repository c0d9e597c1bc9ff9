"""Compiles the FP8 Triton kernels for Hopper (sm90) on a machine without a GPU, with the ptxas that the
triton wheel ships, and prints each kernel's registers and stack (spills) from cuobjdump. Catches code
generation errors that triton's CPU interpreter does not see, and register pressure, before a GPU run.

    python bench/sm90_compile.py

Shapes: the widths of Wan2.1-1.3B and FLUX.1-dev (bf16 activations). Prints one line per kernel.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from diffserve.kernels import fp8

BF16, F32, F8 = "*bf16", "*fp32", "*fp8e4nv"
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict, num_warps: int) -> tuple[int, int]:
    """(registers, stack bytes) of `fn` compiled for sm90; arguments not named are int32 scalars."""
    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return int(m.group(1)), int(m.group(2))


def main() -> None:
    quant = dict(FLOOR=fp8.SCALE_FLOOR, QMAX=fp8.FP8_MAX)
    rows = []
    for k in (1536, 3072, 15360):  # projections' inputs; FLUX's proj_out reads 5 x 3072
        block = triton.next_power_of_2(k)
        rows.append((f"quantize_rows K={k}", fp8._quantize_rows_kernel, dict(x_ptr=BF16, q_ptr=F8, scale_ptr=F32),
                     dict(BLOCK=block, **quant), fp8._row_warps(block)))
    for n in (8960, 12288):  # the MLP widths
        block = triton.next_power_of_2(n)
        rows.append((f"gelu_tanh_fp8 N={n}", fp8._gelu_tanh_fp8_kernel, dict(x_ptr=BF16, bias_ptr=BF16, q_ptr=F8, scale_ptr=F32),
                     dict(HAS_BIAS=False, BLOCK=block, **quant), fp8._row_warps(block)))
    for d, rms, indexed in ((1536, False, False), (1536, False, True), (3072, False, False), (3072, True, False)):
        block = triton.next_power_of_2(d)  # indexed: packed requests' modulation rows (kernels/norm.py)
        ptrs = dict(x_ptr=BF16, w_ptr=F32, b_ptr=F32, shift_ptr=F32, scale_ptr=F32, idx_ptr="*i32", q_ptr=F8, qscale_ptr=F32, eps="fp32")
        rows.append((f"{'rms' if rms else 'layer'}_norm_fp8 D={d}{' indexed' if indexed else ''}", fp8._norm_fp8_kernel, ptrs,
                     dict(D=d, RMS=rms, HAS_W=False, HAS_B=False, HAS_SHIFT=True, HAS_SCALE=True, HAS_INDEX=indexed, BLOCK_D=block,
                          **quant),
                     min(max(block // 256, 1), 8)))
    for heads, tiles_per_part in ((12, 8), (24, 2)):  # Wan 32,760 tokens, FLUX 4,608 (MAX_PARTS 128)
        meta = dict(H=heads, D=128, PARTS=fp8.MAX_PARTS, BLOCK_L=fp8.HEADS_BLOCK_L, BLOCK_D=128)
        rows.append((f"amax_heads H={heads}", fp8._amax_heads_kernel, dict(x_ptr=BF16, part_ptr=F32),
                     dict(TILES_PER_PART=tiles_per_part, **meta), 4))
        rows.append((f"quantize_heads H={heads}", fp8._quantize_heads_kernel, dict(x_ptr=BF16, part_ptr=F32, q_ptr=F8, scale_ptr=F32),
                     dict(**meta, **quant), 4))
    for name, fn, pointers, constexprs, warps in rows:
        regs, stack = compile_sm90(fn, pointers, constexprs, warps)
        print(f"{name:30s} warps {warps:2d}  registers {regs:3d}  stack {stack}")


if __name__ == "__main__":
    main()
