"""Each attention backend against a float32 reference on random inputs, and its speed.

python bench/attention_check.py   (GPU; writes $OUT/attention.json)
"""

from __future__ import annotations

import torch

from common import card, print_table, rel_err, time_ms, write_json
from diffserve.kernels import attention as attn

SHAPES = {  # (heads, tokens, head_dim), from ../shared/GPU.md
    "wan-1.3b-480p-81f": (12, 32760, 128),
    "flux-1024": (24, 4608, 128),
}


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for shape_name, (heads, tokens, dim) in SHAPES.items():
        q, k, v = (torch.randn(1, tokens, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = attn.run_backend("sdpa", q.float(), k.float(), v.float())  # float32 reference
        flops = 4 * heads * tokens * tokens * dim
        for name in attn.available(q.device, q.dtype, dim):
            out = torch.full_like(q, float("nan"))
            out = attn.run_backend(name, q, k, v)
            assert torch.isfinite(out).all(), name
            ms = time_ms(lambda: attn.run_backend(name, q, k, v), warmup=3, repeat=10)
            rows.append(dict(shape=shape_name, backend=name, ms=round(ms, 2), tflops=round(flops / ms / 1e9, 0),
                             rel_err=f"{rel_err(out, ref):.2e}", card=card()))
        q = k = v = ref = None  # free before the next shape
        torch.cuda.empty_cache()
    write_json("attention.json", rows)
    print_table(rows, ["shape", "backend", "ms", "tflops", "rel_err", "card"])


if __name__ == "__main__":
    main()
