"""One DiT forward, diffserve vs diffusers, same full-size config and random weights, bf16, same card.

python bench/dit_forward.py [--models wan-1.3b]   (GPU; writes $OUT/dit_forward.json)

Both sides load the same checkpoint folder with their from_pretrained (diffusers keeps its
fp32 modules; so do we). Exactness: each side's bf16 output against a float32 run of diffusers.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import card, print_table, rel_err, time_ms, write_json
from diffserve.kernels import attention as attn

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
# 480x832, 81 frames → latents (16, 21, 60, 104) → 21*30*52 = 32,760 tokens.
MODELS = {"wan-1.3b": (WAN_13B, (16, 21, 60, 104), "480x832x81")}


def wan_flops(cfg: dict, tokens: int, text: int = 512) -> float:
    d, ffn, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_layer = 2 * tokens * d * d * 4 + 2 * tokens * d * d * 2 + 2 * text * d * d * 2 + 4 * tokens * tokens * d + 4 * tokens * text * d + 2 * tokens * d * ffn * 2
    return layers * per_layer


def bench_wan(name: str, cfg: dict, latent_shape: tuple, shape_label: str, compile_modes: list[str]) -> list[dict]:
    from diffusers import WanTransformer3DModel

    from diffserve.worker.models.wan import WanTransformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("cuda"):
            WanTransformer3DModel(**cfg).to(torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        ref_model = WanTransformer3DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).cuda().eval()
        ours = WanTransformer.from_pretrained(tmp, torch.bfloat16, "cuda").eval()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, *latent_shape, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    ctx = torch.randn(1, 512, cfg["text_dim"], device="cuda", generator=g).to(torch.bfloat16)
    tokens = latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2)
    flops = wan_flops(cfg, tokens)

    with torch.no_grad():
        ref_out = ref_model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        diffusers_ms = time_ms(lambda: ref_model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False))
        ref_model.float()
        fp32 = ref_model(hidden_states=x.float(), timestep=t, encoder_hidden_states=ctx.float(), return_dict=False)[0]
        ref_model = None  # free its memory before timing ours
        torch.cuda.empty_cache()
        diffusers_err = rel_err(ref_out, fp32)
        for backend in attn.available(x.device, x.dtype, cfg["attention_head_dim"]):
            attn.configure(backend)
            out = ours(x, t, ctx)
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(lambda: ours(x, t, ctx))
            rows.append(dict(model=name, shape=shape_label, card=card(), attention=backend, diffserve_ms=round(ms, 1),
                             diffusers_ms=round(diffusers_ms, 1), ratio=round(ms / diffusers_ms, 3),
                             tflops=round(flops / ms / 1e9), diffserve_err=f"{rel_err(out, fp32):.2e}",
                             diffusers_err=f"{diffusers_err:.2e}", peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1)))
        attn.configure("auto")
        for mode in compile_modes:
            import time

            compiled = torch.compile(ours, mode=None if mode == "default" else mode)
            started = time.perf_counter()
            out = compiled(x, t, ctx)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            ms = time_ms(lambda: compiled(x, t, ctx))
            rows.append(dict(model=name, shape=shape_label, card=card(), attention=f"auto+compile:{mode}",
                             diffserve_ms=round(ms, 1), diffusers_ms=round(diffusers_ms, 1), ratio=round(ms / diffusers_ms, 3),
                             tflops=round(flops / ms / 1e9), diffserve_err=f"{rel_err(out, fp32):.2e}",
                             diffusers_err=f"{diffusers_err:.2e}", compile_s=round(compile_s)))
    return rows


FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def bench_flux(compile_modes: list[str]) -> list[dict]:
    """FLUX.1-dev at 1024²: 4,096 packed image tokens + 512 T5 tokens, guidance 3.5."""
    import time

    from diffusers import FluxTransformer2DModel

    from diffserve.worker.models.flux import FluxTransformer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("cuda"):
            FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        ref_model = FluxTransformer2DModel.from_pretrained(tmp, torch_dtype=torch.bfloat16).cuda().eval()
        ours = FluxTransformer.from_pretrained(tmp, torch.bfloat16, "cuda").eval()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 4096, 64, device="cuda", generator=g).to(torch.bfloat16)
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g).to(torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", generator=g).to(torch.bfloat16)
    t = torch.tensor([0.5], device="cuda")
    guidance = torch.tensor([3.5], device="cuda")
    rows_i, cols_i = torch.meshgrid(torch.arange(64, device="cuda"), torch.arange(64, device="cuda"), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows_i), rows_i, cols_i], -1).reshape(4096, 3).float()  # (0, row, col)
    txt_ids = torch.zeros(512, 3, device="cuda")
    tokens = 4096 + 512
    block_params = sum(p.numel() for n, p in ours.named_parameters() if "blocks" in n)
    flops = 2 * block_params * tokens + 4 * tokens * tokens * 3072 * (19 + 38)

    def diffusers_call():
        return ref_model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                         img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    def ours_call():
        return ours(x, t, ctx, pooled, img_ids, txt_ids, guidance)

    with torch.no_grad():
        ref_out = diffusers_call()
        diffusers_ms = time_ms(diffusers_call)
        variants = [("auto", ours_call)]
        for mode in compile_modes:
            compiled = torch.compile(ours, mode=None if mode == "default" else mode)
            variants.append((f"auto+compile:{mode}", lambda c=compiled: c(x, t, ctx, pooled, img_ids, txt_ids, guidance)))
        results = []
        for label, fn in variants:
            started = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - started
            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fn)
            results.append((label, ms, out, first_s, torch.cuda.max_memory_allocated() / 2**30))
        # float32 reference last: 12B parameters in fp32 do not fit beside two bf16 copies on 80 GB.
        ours = variants = compiled = None
        torch.cuda.empty_cache()
        ref_model.float()
        fp32 = ref_model(hidden_states=x.float(), encoder_hidden_states=ctx.float(), pooled_projections=pooled.float(),
                         timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        diffusers_err = rel_err(ref_out, fp32)
        for label, ms, out, first_s, peak in results:
            rows.append(dict(model="flux.1-dev", shape="1024x1024", card=card(), attention=label, diffserve_ms=round(ms, 1),
                             diffusers_ms=round(diffusers_ms, 1), ratio=round(ms / diffusers_ms, 3), tflops=round(flops / ms / 1e9),
                             diffserve_err=f"{rel_err(out, fp32):.2e}", diffusers_err=f"{diffusers_err:.2e}",
                             peak_gib=round(peak, 1), compile_s=round(first_s) if "compile" in label else ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join([*MODELS, "flux.1-dev"]))
    p.add_argument("--compile", default="", help="comma-separated torch.compile modes to time as well (default, max-autotune-no-cudagraphs)")
    args = p.parse_args()
    rows = []
    modes = [m for m in args.compile.split(",") if m]
    columns = ["model", "shape", "attention", "diffserve_ms", "diffusers_ms", "ratio", "tflops", "diffserve_err",
               "diffusers_err", "peak_gib", "compile_s", "card"]
    for name in args.models.split(","):
        rows += bench_flux(modes) if name == "flux.1-dev" else bench_wan(name, *MODELS[name], modes)
        write_json("dit_forward.json", rows)  # after each model, so a later failure keeps these
        print_table(rows, columns)


if __name__ == "__main__":
    main()
