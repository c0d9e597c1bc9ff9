"""Trains the built-in demo model on the CPU from a seed (issue 16):

    python -m diffserve.demo.train OUT_DIR [--seed 0] [--vae-steps 600] [--dit-minutes 30] [--threads N]

1. The VAE (AutoencoderKLWan) on stills and 9-frame clips: L1 reconstruction of the posterior's mean
   (a deterministic autoencoder: the DiT is trained on means), a light L2 pull on the latents. Its
   latents' per-channel mean and std are then measured and written into its config
   (`latents_mean` / `latents_std`), which is how WanPipeline and diffserve normalise latents.
2. A fixed set of scenes is encoded once; the text encoder (UMT5) and the DiT are trained together
   with flow matching on them: sigma from the scheduler's shifted schedule, x_sigma = (1 - sigma) x0
   + sigma noise, target noise - x0, the timestep sigma * 1000, and 10 % of captions dropped to ""
   (classifier-free guidance). Text is embedded exactly as WanPipeline embeds it (real tokens, then
   zeros up to 512). An exponential moving average of the weights is what gets saved.
3. The pipeline folder is written with save_pretrained (safetensors) and scored: diffusers'
   WanPipeline draws a fixed prompt set and demo/evaluate.py reads the pictures back.

Reproducible from its seed (bit-exactness across machines is not promised).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffserve.demo import model as demo_model
from diffserve.demo.data import render, sample

CAPTION_DROP = 0.1
CLIP_FRAMES = 9


def pixels(scenes) -> torch.Tensor:
    """uint8 renders → (B, 3, F, 64, 64) in [-1, 1]."""
    arrays = np.stack([render(s) for s in scenes])  # (B, F, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan._decode without its final clamp to [-1, 1] (no tiling, no patching): a
    clamped output has no gradient where it saturates, which stalls training from a random start."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


VAE_LR = 1e-4  # AutoencoderKLWan from scratch: at 1e-3 it cannot even overfit one batch (L1 stays ~0.45); 1e-4 learns


def train_vae(vae, steps: int, rng: np.random.Generator, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        lr = VAE_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        clip = step % 4 == 3
        scenes = [sample(int(rng.integers(1 << 31)), frames=CLIP_FRAMES if clip else 1) for _ in range(4 if clip else 16)]
        x = pixels(scenes)
        z = vae.encode(x).latent_dist.mode()  # the mean: no sampling noise to learn around (the DiT is trained on means)
        y = decode_unclamped(vae, z)
        loss = (y - x).abs().mean() + 1e-4 * z.pow(2).mean()  # a light pull keeps the latents' scale bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    vae.eval()


@torch.no_grad()
def encode_set(vae, scenes, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(scenes), batch):
        out.append(vae.encode(pixels(scenes[i:i + batch])).latent_dist.mode())
    return torch.cat(out)


@torch.no_grad()
def set_latent_stats(vae, stills: torch.Tensor, clips: torch.Tensor) -> None:
    flat = torch.cat([stills.transpose(0, 1).flatten(1), clips.transpose(0, 1).flatten(1)], dim=1)  # (C, N)
    vae.register_to_config(latents_mean=flat.mean(1).tolist(), latents_std=flat.std(1).clamp_min(1e-3).tolist())


def embed_text(text_encoder, tok, captions: list[str]) -> torch.Tensor:
    """As WanPipeline._get_t5_prompt_embeds: the encoder's states for the real tokens, then zeros to 512."""
    states, lengths = _encode(text_encoder, tok, captions)
    out = states.new_zeros(len(captions), demo_model.MAX_TEXT_TOKENS, states.shape[-1])
    for i, n in enumerate(lengths):
        out[i, :n] = states[i, :n]
    return out


def _encode(text_encoder, tok, captions: list[str]) -> tuple[torch.Tensor, list[int]]:
    inputs = tok(captions, padding="longest", truncation=True, max_length=demo_model.MAX_TEXT_TOKENS, return_tensors="pt")
    return text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state, inputs.attention_mask.sum(1).tolist()


class CompactText:
    """The same cross-attention as over WanPipeline's 512 text rows, at a fraction of the cost.

    Past a prompt's n real tokens the 512 rows are zeros, so their keys and values are all the same
    (the text embedder maps zero to one vector): attending to 512 - n copies of a key equals
    attending to one copy whose score is raised by log(512 - n). Training therefore feeds each row
    its n states, one zero row and an additive mask carrying that log count (-inf on the batch's
    padding), installed on every block's cross-attention by `install`."""

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        class Processor(WanAttnProcessor):
            mask = None

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
                if encoder_hidden_states is not None and self.mask is not None:
                    attention_mask = self.mask
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        self.processor = Processor()

    def install(self, transformer) -> None:
        for block in transformer.blocks:
            block.attn2.set_processor(self.processor)

    def embed(self, text_encoder, tok, captions: list[str]) -> torch.Tensor:
        """(B, n_max + 1, D) states; sets the mask the processor uses for this batch."""
        states, lengths = _encode(text_encoder, tok, captions)
        width = max(lengths) + 1
        out = states.new_zeros(len(captions), width, states.shape[-1])
        mask = torch.full((len(captions), 1, 1, width), float("-inf"))
        for i, n in enumerate(lengths):
            out[i, :n] = states[i, :n]
            mask[i, ..., :n] = 0.0
            mask[i, ..., n] = math.log(demo_model.MAX_TEXT_TOKENS - n)
        self.processor.mask = mask
        return out


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def train_dit(transformer, text_encoder, tok, data: dict, minutes: float, rng: np.random.Generator, log) -> dict:
    """Flow matching on pre-encoded latents; returns the EMA weights of both modules."""
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    ema = {"transformer": copy.deepcopy(transformer).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    transformer.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    compact = CompactText()
    compact.install(transformer)
    started = time.perf_counter()
    step = 0
    while time.perf_counter() - started < minutes * 60:
        clip = rng.random() < 0.3
        latents, captions = (data["clips"], data["clip_captions"]) if clip else (data["stills"], data["still_captions"])
        idx = torch.from_numpy(rng.integers(len(latents), size=16 if clip else 48))
        x0 = latents[idx]
        batch_captions = ["" if rng.random() < CAPTION_DROP else captions[i] for i in idx.tolist()]
        sigma = shifted_sigmas(torch.rand(len(idx), generator=gen), demo_model.SCHEDULER["flow_shift"])
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        context = compact.embed(text_encoder, tok, batch_captions)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, live in (("transformer", transformer), ("text_encoder", text_encoder)):
                for e, p in zip(ema[name].parameters(), live.parameters()):
                    e.lerp_(p, 1 - decay)
        if step % 100 == 0:
            log(f"dit step {step} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        step += 1
    log(f"dit: {step} steps in {time.perf_counter() - started:.0f} s")
    for module in (transformer, ema["transformer"]):
        module.set_attn_processor(type(compact.processor).__mro__[1]())  # diffusers' own again
    return ema


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffserve.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--dit-minutes", type=float, default=30.0)
    p.add_argument("--stills", type=int, default=4000, help="scenes encoded for the DiT's training set")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--vae-from", default="", help="reuse the VAE of an earlier run's folder (skips step 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    rng = np.random.default_rng(args.seed)
    vae, text_encoder, transformer = demo_model.new_modules(args.seed)
    started = time.perf_counter()
    if args.vae_from:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(Path(args.vae_from) / "vae").eval()
    else:
        train_vae(vae, args.vae_steps, rng, log)
    still_scenes = [sample(int(rng.integers(1 << 31))) for _ in range(args.stills)]
    clip_scenes = [sample(int(rng.integers(1 << 31)), frames=CLIP_FRAMES) for _ in range(args.clips)]
    stills, clips = encode_set(vae, still_scenes, 64), encode_set(vae, clip_scenes, 8)
    if not args.vae_from:
        set_latent_stats(vae, stills, clips)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    data = {"stills": (stills - mean) / std, "clips": (clips - mean) / std,
            "still_captions": [s.caption for s in still_scenes], "clip_captions": [s.caption for s in clip_scenes]}
    log(f"encoded {len(still_scenes)} stills and {len(clip_scenes)} clips ({time.perf_counter() - started:.0f} s so far)")
    tok = demo_model.tokenizer()
    ema = train_dit(transformer, text_encoder, tok, data, args.dit_minutes, rng, log)
    demo_model.save(out, vae, ema["text_encoder"], ema["transformer"])
    log(f"wrote {out} ({time.perf_counter() - started:.0f} s in all)")
    (out / "training.json").write_text(json.dumps({"args": vars(args), "log": log_lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
