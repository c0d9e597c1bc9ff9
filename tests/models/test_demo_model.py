"""The demo model's training path on a few steps (issue 16): the folder it writes loads in diffusers'
WanPipeline and in diffserve's Wan pipeline with the demo's card defaults; the training-time text
shortcut (CompactText) equals the 512-row cross-attention WanPipeline runs."""

from __future__ import annotations

import json

import torch

from diffserve.demo import model as demo_model
from diffserve.demo.data import sample
from diffserve.demo.train import CompactText, embed_text, main as train


def test_compact_text_equals_the_padded_512_rows():
    _, text_encoder, transformer = demo_model.new_modules(0)
    tok = demo_model.tokenizer()
    captions = [sample(1).caption, "", sample(2, frames=9).caption]
    x, t = torch.randn(3, 16, 1, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embed_text(text_encoder, tok, captions), return_dict=False)[0]
        compact = CompactText()
        compact.install(transformer)
        short = transformer(hidden_states=x, timestep=t, encoder_hidden_states=compact.embed(text_encoder, tok, captions), return_dict=False)[0]
    assert embed_text(text_encoder, tok, captions).shape[1] == 512
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_captions_tokenize_without_unknown_words():
    tok = demo_model.tokenizer()
    for scene in [sample(i) for i in range(50)] + [sample(i, frames=9) for i in range(20)]:
        ids = tok(scene.caption).input_ids
        assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id


def test_a_short_training_run_writes_a_folder_both_pipelines_load(tmp_path):
    out = tmp_path / "demo"
    assert train([str(out), "--vae-steps", "2", "--dit-steps", "2", "--stills", "16", "--clips", "2", "--threads", "1",
                  "--no-score"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert set(record["reconstruction"]) >= {"colour+background", "shape", "place", "motion", "misses"}
    assert (out / "reconstructions.png").exists()
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert len(vae_config["latents_mean"]) == 16 and all(s > 0 for s in vae_config["latents_std"])
    assert json.loads((out / "diffserve.json").read_text())["defaults"]["height"] == 64

    from diffusers import WanPipeline

    frames = WanPipeline.from_pretrained(out)(sample(3).caption, height=64, width=64, num_frames=1, num_inference_steps=2,
                                             output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 1, 64, 64, 3)

    from diffserve.worker.pipelines.wan import WanPipeline as Ours

    card = Ours(out, "demo", torch.device("cpu"), torch.float32).card
    assert (card.defaults.height, card.defaults.width, card.defaults.num_frames, card.defaults.num_inference_steps) == (64, 64, 1, 20)
