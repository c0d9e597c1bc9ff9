"""Trains the built-in demo model on the CPU from a seed (issue 16):

    python -m diffserve.demo.train OUT_DIR [--seed 0] [--vae-steps 1200] [--dit-steps 9000] [--threads N] [--device cpu]

1. The VAE (AutoencoderKLWan) on stills and 9-frame clips: L1 reconstruction of the posterior's mean
   (a deterministic autoencoder: the DiT is trained on means), the shape's pixels weighted 9x, a light
   L2 pull on the latents. The evaluator then reads its reconstructions of fixed scenes back. Its
   latents' per-channel mean and std are then measured and written into its config
   (`latents_mean` / `latents_std`), which is how WanPipeline and diffserve normalise latents.
2. A fixed set of scenes is encoded once; the text encoder (UMT5) and the DiT are trained together
   with flow matching on them: sigma from the scheduler's shifted schedule, x_sigma = (1 - sigma) x0
   + sigma noise, target noise - x0, the timestep sigma * 1000, 10 % of captions dropped to "" (classifier-free
   guidance) and a still's size or place left out of a quarter of the others (data.loose_caption). Text is embedded exactly as WanPipeline embeds it (real tokens, then
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

from diffserve.demo import data as demo_data, model as demo_model
from diffserve.demo.data import COLOURS, PLACES, loose_caption, render, sample
from diffserve.demo.evaluate import judge, score

CAPTION_DROP = 0.1
CLIP_FRAMES = 9


def pixels(scenes, device="cpu") -> torch.Tensor:
    """uint8 renders → (B, 3, F, 64, 64) in [-1, 1]."""
    arrays = np.stack([render(s) for s in scenes])  # (B, F, H, W, 3)
    return torch.from_numpy(arrays).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def object_weight(scenes, weight: float, device="cpu") -> torch.Tensor:
    """(B, 1, F, 64, 64): 1 on the background, 1 + weight on the shape's pixels. A shape covers 6-20 %
    of a picture, so a plain loss is mostly background; the VAE then learns backgrounds first and
    shapes very late."""
    masks = np.stack([(render(s) != np.asarray(COLOURS[s.background], dtype=np.uint8)).any(-1) for s in scenes])
    return 1 + weight * torch.from_numpy(masks).to(device).float().unsqueeze(1)


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


VAE_LR = 5e-4  # with warm-up and gradient clipping (without them, AutoencoderKLWan from scratch does not learn at 1e-3)
VAE_OBJECT_WEIGHT = 8.0
VAE_WARMUP = 50


def out_of_time(started: float, max_seconds: float, step: int, steps: int, what: str, log) -> bool:
    """True (and logged) once a stage has run `max_seconds` (0: no limit): recipe searches on a
    time-limited machine stop a stage early and keep what it learned, rather than lose the run."""
    if not max_seconds or time.perf_counter() - started < max_seconds:
        return False
    log(f"{what}: stopped after {step} of {steps} steps ({max_seconds:.0f} s limit)")
    return True


def train_vae(vae, steps: int, rng: np.random.Generator, log, lr: float = VAE_LR, object_weight_: float = VAE_OBJECT_WEIGHT,
              device="cpu", max_seconds: float = 0.0) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        if out_of_time(started, max_seconds, step, steps, "vae", log):
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / VAE_WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        clip = step % 4 == 3
        scenes = [sample(int(rng.integers(1 << 31)), frames=CLIP_FRAMES if clip else 1) for _ in range(4 if clip else 16)]
        x = pixels(scenes, device)
        z = vae.encode(x).latent_dist.mode()  # the mean: no sampling noise to learn around (the DiT is trained on means)
        y = decode_unclamped(vae, z)
        w = object_weight(scenes, object_weight_, device)
        loss = ((y - x).abs() * w).sum() / (w.sum() * 3) + 1e-4 * z.pow(2).mean()  # a light pull keeps the latents' scale bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    vae.eval()


@torch.no_grad()
def reconstruction_score(vae, device="cpu", out: Path | None = None) -> dict:
    """The evaluator's reading of the VAE's reconstructions of 40 fixed scenes: what the DiT can at
    best be scored at. With `out`, also writes out/reconstructions.png (each still above its
    reconstruction) and lists the misses."""
    from diffserve.demo.evaluate import read

    scenes = [sample(800_000 + i) for i in range(32)] + [sample(850_000 + i, frames=CLIP_FRAMES) for i in range(8)]
    verdicts, misses, stills = [], [], None
    for group in (scenes[:32], scenes[32:]):
        y = vae.decode(vae.encode(pixels(group, device)).latent_dist.mode()).sample
        frames = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        stills = frames if stills is None else stills
        for scene, f in zip(group, frames):
            verdicts.append(judge(scene, f))
            if not all(verdicts[-1].values()):
                misses.append(f"{scene.caption} -> {read(f)}")
    result = {k: round(v, 3) for k, v in score(verdicts).items()}
    if out is not None:
        from PIL import Image

        top = np.concatenate([render(s)[0] for s in scenes[:16]], 1)
        bottom = np.concatenate(list(stills[:16, 0]), 1)
        Image.fromarray(np.concatenate([top, bottom], 0)).save(out / "reconstructions.png")
        result["misses"] = misses
    return result


@torch.no_grad()
def encode_set(vae, scenes, batch: int, device="cpu") -> torch.Tensor:
    out = []
    for i in range(0, len(scenes), batch):
        out.append(vae.encode(pixels(scenes[i:i + batch], device)).latent_dist.mode())
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
    device = text_encoder.device
    return (text_encoder(inputs.input_ids.to(device), inputs.attention_mask.to(device)).last_hidden_state,
            inputs.attention_mask.sum(1).tolist())


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
        mask = torch.full((len(captions), 1, 1, width), float("-inf"), device=states.device)
        for i, n in enumerate(lengths):
            out[i, :n] = states[i, :n]
            mask[i, ..., :n] = 0.0
            mask[i, ..., n] = math.log(demo_model.MAX_TEXT_TOKENS - n)
        self.processor.mask = mask
        return out


CROSS_ATTN_GAIN = 4.0


@torch.no_grad()
def open_text_path(transformer, gain: float) -> None:
    """The initial cross-attention, made able to attend to the prompt. WanPipeline pads every prompt to
    512 rows of zeros, all mapped to one key: with qk-RMSNorm and 32-dim heads a real token's score
    can exceed that key's by at most ~sqrt(32) = 5.7, against log(500) = 6.2 for the padding's copies,
    so at diffusers' init the prompt gets a few % of the attention. `gain` scales the q / k norm
    weights (the logits by gain²), and the padding's key and value start at zero (the text projection's
    and the key / value biases zeroed), so the padding adds nothing until training says otherwise."""
    if gain == 1.0:
        return
    for block in transformer.blocks:
        block.attn2.norm_q.weight.fill_(gain)
        block.attn2.norm_k.weight.fill_(gain)
        block.attn2.to_k.bias.zero_()
        block.attn2.to_v.bias.zero_()
    projection = transformer.condition_embedder.text_embedder
    projection.linear_1.bias.zero_()
    projection.linear_2.bias.zero_()


DIT_LR = 5e-4
DIT_BATCH = 24  # stills per step (a third as many clips)
DIT_OBJECT_WEIGHT = 0.0  # extra loss weight on the latent cells the shape covers (0: a plain loss)


def latent_weights(scenes, weight: float, device="cpu") -> torch.Tensor:
    """(B, 1, T, 16, 16): 1, plus `weight` on the latent cells a scene's shape touches (the frame left
    out). A shape covers 6-20 % of a picture: a plain loss is mostly background, and where the shape is
    and what outline it has (the words the DiT must read) weigh little in it. Latent frame 0 is pixel
    frame 0, latent frame k pixel frames 4k-3..4k (the VAE's causal 4x time compression)."""
    masks = []
    for s in scenes:
        m = torch.from_numpy(np.stack([demo_data.shape_mask(s.shape, c, demo_data.SIZES[s.size]) for c in s.centres()]))
        groups = [m[:1]] + [m[1 + 4 * k:5 + 4 * k] for k in range((len(m) - 1) // 4)]
        m = torch.stack([g.any(0) for g in groups]).float()  # (T, 64, 64)
        masks.append(F.max_pool2d(m.unsqueeze(1), 4).squeeze(1))
    return 1 + weight * torch.stack(masks).unsqueeze(1).to(device)


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def train_dit(transformer, text_encoder, tok, data: dict, steps: int, rng: np.random.Generator, log, device="cpu",
              lr: float = 0.0, batch: int = 0, max_seconds: float = 0.0, drill_steps: int = 0, drill_mix: float = 0.0) -> dict:
    """Flow matching on pre-encoded latents; returns the EMA weights of both modules. With place-drill
    scenes in `data` ("drills"), the first `drill_steps` steps and a `drill_mix` share of the others train on them."""
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    lr, batch = lr or DIT_LR, batch or DIT_BATCH
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {"transformer": copy.deepcopy(transformer).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    transformer.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    compact = CompactText()
    compact.install(transformer)
    started, ran, drilled = time.perf_counter(), 0, 0
    for step in range(steps):
        if out_of_time(started, max_seconds, step, steps, "dit", log):
            break
        ran = step + 1
        # The cosine follows the steps, or the time when a time limit ends the run first (it then still decays).
        progress = max(step / steps, (time.perf_counter() - started) / max_seconds if max_seconds else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        drill = "drills" in data and (step < drill_steps or rng.random() < drill_mix)
        drilled += drill
        clip = not drill and rng.random() < 0.3
        kind = "drill" if drill else "clip" if clip else "still"
        latents, scenes = data[f"{kind}s"], data[f"{kind}_scenes"]
        idx = torch.from_numpy(rng.integers(len(latents), size=batch // 3 if clip else batch))
        x0 = latents[idx.to(latents.device)]
        weights = data.get(f"{kind}_weights")
        batch_captions = ["" if rng.random() < CAPTION_DROP else loose_caption(scenes[i], rng) for i in idx.tolist()]
        sigma = shifted_sigmas(torch.rand(len(idx), generator=gen), demo_model.SCHEDULER["flow_shift"]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        context = compact.embed(text_encoder, tok, batch_captions)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=context, return_dict=False)[0]
        if weights is None:
            loss = F.mse_loss(pred, noise - x0)
        else:
            w = weights[idx.to(weights.device)]
            loss = (w * (pred - (noise - x0)) ** 2).mean() / w.mean()
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
            log(f"dit step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    log(f"dit: {ran} steps run in {time.perf_counter() - started:.0f} s ({drilled} on place drills)")
    log(f"dit: caption loss gaps at sigma 0.9 (wrong word minus right, EMA weights): {caption_gaps(ema, compact, tok, data, device)}")
    for module in (transformer, ema["transformer"]):
        module.set_attn_processor(type(compact.processor).__mro__[1]())  # diffusers' own again
    return ema


def drill_scene(seed: int) -> demo_data.Scene:
    """A place drill: a large red square on a white background at one of the places, nothing else
    varying. Trained on such scenes alone, the third round's DiT learned to read the place words; mixed
    into the full data for 2,500 steps they taught nothing (docs/decisions.md, fifth round)."""
    rng = np.random.default_rng(seed)
    place = list(PLACES)[rng.integers(len(PLACES))]
    cx, cy = PLACES[place][1]
    jx, jy = (float(v) for v in rng.uniform(-demo_data.JITTER, demo_data.JITTER, size=2))
    return demo_data.Scene("red", "square", "large", "white", place=place, centre=(cx + jx, cy + jy))


SWAPS = {"place": [phrase for phrase, _ in PLACES.values()], "shape": list(demo_data.SHAPES), "colour": list(COLOURS)}


@torch.no_grad()
def caption_gaps(ema: dict, compact, tok, data: dict, device, n: int = 96, sigma: float = 0.9) -> dict:
    """Whether the DiT reads each kind of word: its loss on n stills at `sigma` with one word of the caption
    swapped for another of its kind, minus its loss with the right caption (same noise). ~0: the word is
    ignored. The EMA copies with the training's compact text path."""
    transformer, text_encoder = ema["transformer"], ema["text_encoder"]
    compact.install(transformer)
    gen = torch.Generator().manual_seed(0)
    x0 = data["stills"][:n]
    scenes = data["still_scenes"][:n]
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    s = torch.full((len(x0),), sigma, device=x0.device)
    xt = (1 - sigma) * x0 + sigma * noise

    def loss(captions: list[str]) -> float:
        pred = transformer(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=compact.embed(text_encoder, tok, captions), return_dict=False)[0]
        return F.mse_loss(pred, noise - x0).item()

    right = [sc.caption for sc in scenes]
    base = loss(right)
    gaps = {"right": round(base, 4), "none": round(loss([""] * len(scenes)) - base, 4)}
    for kind, words in SWAPS.items():
        swapped = []
        for i, (sc, caption) in enumerate(zip(scenes, right)):
            word = PLACES[sc.place][0] if kind == "place" else getattr(sc, kind)
            other = [w for w in words if w != word]
            swapped.append(caption.replace(f" {word} ", f" {other[i % len(other)]} ", 1))
        gaps[kind] = round(loss(swapped) - base, 4)
    return gaps


@torch.no_grad()
def pipeline_score(path: Path, device: str, steps: int = 20) -> dict:
    """demo/quality's prompt set drawn by diffusers' WanPipeline from the written folder (the
    reference path; quality.py scores the same set through diffserve's service)."""
    from diffusers import WanPipeline

    from diffserve.demo import quality

    pipe = WanPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)

    drawn = []

    def generate(scene, seed: int) -> np.ndarray:
        out = pipe(scene.caption, height=64, width=64, num_frames=scene.frames, num_inference_steps=steps,
                   guidance_scale=demo_model.CARD_DEFAULTS["guidance_scale"], output_type="np",
                   generator=torch.Generator(device).manual_seed(seed)).frames[0]
        drawn.append((out * 255).round().astype(np.uint8))
        return drawn[-1]

    result = quality.evaluate(generate)
    from PIL import Image

    Image.fromarray(np.concatenate([np.concatenate([d[0] for d in drawn[r * 16:(r + 1) * 16]], 1) for r in range(3)], 0)).save(path / "samples.png")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffserve.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-lr", type=float, default=VAE_LR)
    p.add_argument("--vae-object-weight", type=float, default=VAE_OBJECT_WEIGHT, help="extra loss weight on the shape's pixels")
    p.add_argument("--vae-decoder-dim", type=int, default=demo_model.VAE["decoder_base_dim"], help="the VAE decoder's base width")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE (writes OUT/vae and its reconstruction score)")
    p.add_argument("--dit-steps", type=int, default=9000)
    p.add_argument("--dit-lr", type=float, default=DIT_LR)
    p.add_argument("--dit-batch", type=int, default=DIT_BATCH, help="stills per step (a third as many clips)")
    p.add_argument("--dit-object-weight", type=float, default=DIT_OBJECT_WEIGHT, help="extra DiT loss weight on the shape's latent cells")
    p.add_argument("--place-drills", type=int, default=0, help="place-drill scenes encoded (a red square on white, only the place varies)")
    p.add_argument("--drill-steps", type=int, default=0, help="the DiT's first steps on place drills only")
    p.add_argument("--drill-mix", type=float, default=0.0, help="share of the later steps on place drills")
    p.add_argument("--stills", type=int, default=4000, help="scenes encoded for the DiT's training set")
    p.add_argument("--clips", type=int, default=600)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (the reference recipe) or cuda")
    p.add_argument("--vae-from", default="", help="reuse the VAE of an earlier run's folder (skips step 1; its latent stats are measured again)")
    p.add_argument("--dit-from", default="", help="continue from an earlier run's text encoder and DiT")
    p.add_argument("--vae-max-seconds", type=float, default=0.0, help="stop the VAE's training after this long (0: no limit)")
    p.add_argument("--dit-max-seconds", type=float, default=0.0, help="stop the DiT's training after this long, keeping what it learned (0: no limit)")
    p.add_argument("--no-score", action="store_true", help="skip scoring the written model with WanPipeline")
    p.add_argument("--frame", type=int, default=demo_data.FRAME, help="grey frame round every picture, pixels (data.FRAME)")
    p.add_argument("--cross-attn-gain", type=float, default=CROSS_ATTN_GAIN,
                   help="initial cross-attention q/k norm weight (text keys must outscore 500 padding copies; 1: diffusers' init)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    def write_record(**extra) -> None:
        (out / "training.json").write_text(json.dumps({"args": vars(args), "log": log_lines, **extra}, indent=1))

    demo_data.FRAME = args.frame
    rng = np.random.default_rng(args.seed)
    vae, text_encoder, transformer = demo_model.new_modules(args.seed, decoder_base_dim=args.vae_decoder_dim)
    open_text_path(transformer, args.cross_attn_gain)
    started = time.perf_counter()
    if args.vae_from:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(Path(args.vae_from) / "vae").to(device).eval()
    else:
        vae.to(device)
        train_vae(vae, args.vae_steps, rng, log, lr=args.vae_lr, object_weight_=args.vae_object_weight, device=device,
                  max_seconds=args.vae_max_seconds)
    recon = reconstruction_score(vae, device, out)
    log(f"vae reconstructions read back: { {k: v for k, v in recon.items() if k != 'misses'} } ({time.perf_counter() - started:.0f} s so far)")
    if args.vae_only:
        vae.cpu().save_pretrained(out / "vae", safe_serialization=True)
        write_record(reconstruction=recon)
        return 0
    still_scenes = [sample(int(rng.integers(1 << 31))) for _ in range(args.stills)]
    clip_scenes = [sample(int(rng.integers(1 << 31)), frames=CLIP_FRAMES) for _ in range(args.clips)]
    stills, clips = encode_set(vae, still_scenes, 64, device), encode_set(vae, clip_scenes, 8, device)
    set_latent_stats(vae, stills, clips)  # measured on this run's set (a reused VAE's config may hold other stats)
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    data = {"stills": (stills - mean) / std, "clips": (clips - mean) / std,
            "still_scenes": still_scenes, "clip_scenes": clip_scenes}
    if args.place_drills:
        drill_scenes = [drill_scene(int(rng.integers(1 << 31))) for _ in range(args.place_drills)]
        data["drills"], data["drill_scenes"] = (encode_set(vae, drill_scenes, 64, device) - mean) / std, drill_scenes
    if args.dit_object_weight:
        for kind in ("still", "clip", "drill"):
            if f"{kind}_scenes" in data:
                data[f"{kind}_weights"] = latent_weights(data[f"{kind}_scenes"], args.dit_object_weight, device)
    log(f"encoded {len(still_scenes)} stills and {len(clip_scenes)} clips ({time.perf_counter() - started:.0f} s so far)")
    tok = demo_model.tokenizer()
    if args.dit_from:
        from diffusers import WanTransformer3DModel
        from transformers import UMT5EncoderModel

        transformer = WanTransformer3DModel.from_pretrained(Path(args.dit_from) / "transformer")
        text_encoder = UMT5EncoderModel.from_pretrained(Path(args.dit_from) / "text_encoder")
    ema = train_dit(transformer.to(device), text_encoder.to(device), tok, data, args.dit_steps, rng, log, device,
                    lr=args.dit_lr, batch=args.dit_batch, max_seconds=args.dit_max_seconds,
                    drill_steps=args.drill_steps, drill_mix=args.drill_mix)
    demo_model.save(out, vae.cpu(), ema["text_encoder"].cpu(), ema["transformer"].cpu())
    log(f"wrote {out} ({time.perf_counter() - started:.0f} s in all)")
    result = {} if args.no_score else pipeline_score(out, device)
    if result:
        log(f"WanPipeline's pictures read back: {result}")
    write_record(reconstruction=recon, score=result, seconds=round(time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
