"""Sequence parallelism inside the DiT forward (gloo, CPU): Ulysses 2 × Ring 2 gives the
single-process output for Wan (self-attention, cross-attention context whole), FLUX
(joint attention, double and single stream), Qwen-Image (joint attention with a padded,
masked text row) and HunyuanVideo (joint [video, text] attention, double and single stream, a
row with a shorter text), with token counts that do not divide by the group (padding path).
Plus the Ring merge and the layout planner on their own."""

from __future__ import annotations

import pytest
import torch

from dist_util import run_group

from diffserve.kernels.attention import attention, attention_lse
from diffserve.worker.parallel import ParallelDims
from diffserve.worker.parallel.layout import plan_layout
from diffserve.kernels.merge import merge

HEADS = 4  # so that ulysses 2 (and tp 2 later) divide them
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
           freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
FLUX = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=HEADS,
            joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
QWEN = dict(patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=8, num_attention_heads=HEADS,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4))
HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=8, num_layers=1, num_single_layers=2,
               num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
               pooled_projection_dim=16, rope_axes_dim=(2, 2, 4))


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _cases():
    """(name, model, forward args) with token counts 3·3·5 = 45, 5·5 = 25 and 5·3 = 15."""
    from diffserve.worker.models.flux import FluxConfig, FluxTransformer
    from diffserve.worker.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffserve.worker.models.wan import WanConfig, WanTransformer

    g = torch.Generator().manual_seed(1)
    wan = _randomize(WanTransformer(WanConfig.from_dict(WAN)))
    wan_args = (torch.randn(2, 4, 3, 6, 10, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 7, 16, generator=g))

    flux = _randomize(FluxTransformer(FluxConfig.from_dict(FLUX)))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(5.0), torch.arange(5.0), indexing="ij"), -1).reshape(25, 3)
    flux_args = (torch.randn(2, 25, 8, generator=g), torch.tensor([900.0, 400.0]), torch.randn(2, 6, 16, generator=g),
                 torch.randn(2, 16, generator=g), img_ids, torch.zeros(6, 3), torch.tensor([3.5, 3.5]))

    qwen = _randomize(QwenImageTransformer(QwenImageConfig.from_dict(QWEN)))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # the second row's prompt is shorter: padded text keys masked
    qwen_args = (torch.randn(2, 15, 8, generator=g), torch.tensor([800.0, 200.0]), torch.randn(2, 6, 16, generator=g), mask, [(1, 5, 3)])
    # Qwen-Image-Edit: the input image's tokens follow the noise tokens (two image shapes, 15 + 12 tokens)
    qwen_edit = _randomize(QwenImageTransformer(QwenImageConfig.from_dict(QWEN)))  # its own copy: tp shards in place
    edit_args = (torch.randn(2, 27, 8, generator=g), torch.tensor([700.0, 300.0]), torch.randn(2, 6, 16, generator=g), mask,
                 [(1, 5, 3), (1, 3, 4)])
    return [("wan", wan, wan_args), ("flux", flux, flux_args), ("qwen", qwen, qwen_args), ("qwen-edit", qwen_edit, edit_args)]


def _hunyuan_case():
    """HunyuanVideo with 3·3·5 = 45 video tokens; the second row's text is 4 valid tokens then 3 of
    (random) padding, so padded text keys must be masked. Apart from `_cases()` (kept to the models
    served through test_parallel.py's layouts); test_tensor_parallel.py runs it under tp too."""
    from diffserve.worker.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer

    g = torch.Generator().manual_seed(2)
    model = _randomize(HunyuanVideoTransformer(HunyuanVideoConfig.from_dict(HUNYUAN)))
    args = (torch.randn(2, 4, 3, 6, 10, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 7, 16, generator=g),
            [7, 4], torch.randn(2, 16, generator=g), torch.tensor([6.0, 3.5]))
    return "hunyuan", model, args


def _check_layout(rank: int, world: int, init: str, ulysses: int, ring: int) -> None:
    from diffserve.worker.parallel import ParallelState

    torch.set_grad_enabled(False)
    state = ParallelState.init(ParallelDims(ulysses=ulysses, ring=ring), rank, init, torch.device("cpu"))
    assert state.sequence is not None and state.sequence.size == world
    from diffserve.worker.parallel.plans import parallelize

    for name, model, args in _cases() + [_hunyuan_case()]:
        single = model(*args)
        parallelize(model, state)
        ours = model(*args)
        err = (ours - single).abs().max().item()
        assert err < 1e-4, f"{name} ulysses {ulysses} ring {ring} rank {rank}: max error {err}"
        assert single.std() > 0.1


def test_usp_equals_single_process():
    """Ulysses 2 x Ring 2 on 4 processes (ulysses alone and ring alone run through the service in
    test_parallel.py for the same four families)."""
    run_group(_check_layout, 4, 2, 2)


def test_ring_merge_of_blocks_equals_whole_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 3, 8), torch.randn(2, 20, 3, 8), torch.randn(2, 20, 3, 8)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    out, lse = attention_lse(q, k[:, :7], v[:, :7], key_mask=mask[:, :7])
    out = out.float()
    for lo, hi in ((7, 12), (12, 20)):  # the last block is all padding for row 1
        out, lse = merge(out, lse, *attention_lse(q, k[:, lo:hi], v[:, lo:hi], key_mask=mask[:, lo:hi]))
    torch.testing.assert_close(out, attention(q, k, v, key_mask=mask), atol=1e-5, rtol=1e-5)


class _Model(torch.nn.Module):
    """A DiT of the Wan family as the planner sees it (its plan is found by the module name)."""

    def __init__(self, heads: int):
        super().__init__()
        self.config = type("Config", (), {"num_attention_heads": heads})()


_Model.__module__ = "diffserve.worker.models.wan"


class _Unplanned(_Model):
    """A transformer whose family has no plan file (no sequence- or tensor-parallel path)."""


_Unplanned.__module__ = "diffserve.worker.models.unplanned"


@pytest.mark.parametrize("gpus,kw,expect", [
    (4, dict(cfg_capable=True, uses_cfg=True), ParallelDims(cfg=2, ulysses=2)),  # CFG first, then Ulysses
    (4, dict(cfg_capable=True, uses_cfg=False), ParallelDims(ulysses=4)),
    (8, dict(cfg_capable=False, uses_cfg=True, heads=6), ParallelDims(ulysses=2, ring=4)),  # Ulysses as far as heads allow
    (4, dict(cfg_capable=True, uses_cfg=True, ring=2), ParallelDims(ulysses=2, ring=2)),  # explicit degrees: no auto CFG
    (4, dict(cfg_capable=True, uses_cfg=True, ring=2, enable_cfg_parallel=True), ParallelDims(cfg=2, ring=2)),
])
def test_auto_layout(gpus, kw, expect):
    heads = kw.pop("heads", 12)
    dims, problems = plan_layout(gpus, [_Model(heads)], **kw)
    assert (dims, problems) == (expect, [])


def test_layout_problems_name_the_numbers():
    _, problems = plan_layout(2, [_Model(3)], cfg_capable=False, uses_cfg=False, ulysses=2)
    assert problems == ["3 attention heads do not divide by ulysses 2 × tp 1"]
    _, problems = plan_layout(4, [_Model(4)], cfg_capable=False, uses_cfg=True, enable_cfg_parallel=True)
    assert any("no CFG-parallel path" in p for p in problems)
    _, problems = plan_layout(2, [_Unplanned(4)], cfg_capable=False, uses_cfg=False)
    assert any("no sequence-parallel path" in p for p in problems)
