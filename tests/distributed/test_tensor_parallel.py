"""Tensor parallelism (gloo, CPU): Wan, FLUX, Qwen-Image and HunyuanVideo DiTs split over tp 2 give the
single-process output, also combined with Ulysses 2 (4 ranks) and with CFG-parallel 2 (4 ranks,
Wan). Text encoders split over tp 2 give their unsplit hidden states: T5 (ReLU MLP, shared
relative bias), UMT5 (gated MLP, a bias table per layer), Qwen2.5-VL as our Qwen-Image checkpoints
have it (one K/V head: replicated per rank), a Qwen2.5-VL text model with K/V heads split, and Llama.
Plus the layout checks that refuse models without a tensor-parallel path."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffserve.worker.parallel import ParallelDims
from diffserve.worker.parallel.layout import plan_layout

from dist_util import run_group
from test_sequence_parallel import WAN, _cases, _hunyuan_case, _randomize, _Unplanned


def _state(rank: int, init: str, **dims):
    from diffserve.worker.parallel import ParallelState

    torch.set_grad_enabled(False)
    return ParallelState.init(ParallelDims(**dims), rank, init, torch.device("cpu"))


def _assert_own_storage(model: torch.nn.Module) -> None:
    """No parameter is a view keeping a full (unsplit) weight alive."""
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), f"{name} holds a larger storage"


def _wan_i2v():
    """Wan with I2V's image cross-attention (add_k_proj / add_v_proj, norm_added_k across heads)."""
    from diffserve.worker.models.wan import WanConfig, WanTransformer

    model = _randomize(WanTransformer(WanConfig.from_dict({**WAN, "image_dim": 12, "added_kv_proj_dim": 32})))
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 4, 3, 6, 10, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 7, 16, generator=g),
            torch.randn(2, 5, 12, generator=g))
    return "wan-i2v", model, args


def _check_dits(rank: int, state) -> None:
    from diffserve.worker.parallel.cfg import split_rows
    from diffserve.worker.parallel.plans import parallelize
    from diffserve.worker.parallel.tensor import RowParallelLinear

    for name, model, args in _cases() + [_wan_i2v(), _hunyuan_case()]:
        if state.dims.cfg > 1 and name != "wan":  # cfg: the (x, t, ctx) call of Wan T2V is enough
            continue
        single = model(*args)
        params = sum(p.numel() for p in model.parameters())
        parallelize(model, state)  # tp first, then the sequence over the local heads
        assert sum(p.numel() for p in model.parameters()) < params, f"{name}: weights not split"
        _assert_own_storage(model)
        assert any(isinstance(m, RowParallelLinear) for m in model.modules())
        ours = split_rows(state, model)(*args)
        err = (ours - single).abs().max().item()
        assert err < 1e-4, f"{name} {state.dims} rank {rank}: max error {err}"
        assert single.std() > 0.1


def _check_lora(rank: int, state, names=("wan", "flux", "qwen", "hunyuan")) -> None:
    """Per-row LoRA adapters on the split DiTs (column-parallel layers take their rows of lora_B,
    row-parallel ones their columns of lora_A and the bias on one rank) give the single process's rows."""
    import copy

    from diffserve.worker.parallel.plans import parallelize
    from diffserve.worker.pipelines.lora import ServedLora
    from tests.fixtures.tiny.lora import write_lora

    with tempfile.TemporaryDirectory(prefix="lora-") as folder:
        for name, model, args in [c for c in _cases() + [_hunyuan_case()] if c[0] in names]:
            shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            blocks = [r".*blocks\.\d+\..*"]
            write_lora(Path(folder) / f"{name}-a.safetensors", shapes, blocks, seed=1, alpha=8.0, bias=True)
            write_lora(Path(folder) / f"{name}-b.safetensors", shapes, blocks, rank=2, seed=2)

            def run(model):
                lora = ServedLora(model, Path(folder), 1 << 30, None)
                a, b = lora.cache.get(f"{name}-a"), lora.cache.get(f"{name}-b")
                with lora.layers.rows([((a, 1.0),), ((a, 0.5), (b, 1.0))]):
                    return model(*args)

            single, plain = run(copy.deepcopy(model)), model(*args)
            parallelize(model, state)
            ours = run(model)
            err = (ours - single).abs().max().item()
            assert err < 1e-4, f"{name} {state.dims} rank {rank}: max error {err}"
            assert (single - plain).abs().max() > 0.05, f"{name}: the adapters change nothing"


def _tp2(rank: int, world: int, init: str) -> None:
    state = _state(rank, init, tp=2)
    _check_dits(rank, state)
    _check_encoders(rank, state)
    _check_lora(rank, state)


def _four_ranks(rank: int, world: int, init: str, second_init: str) -> None:
    import torch.distributed as dist

    state = _state(rank, init, ulysses=2, tp=2)
    _check_dits(rank, state)
    _check_lora(rank, state, names=("wan",))
    dist.destroy_process_group()  # same processes, second layout (saves starting 4 more on CPU)
    _check_dits(rank, _state(rank, second_init, cfg=2, tp=2))


def test_tensor_parallel_equals_single_process_tp2():
    """DiTs and text encoders over tp 2."""
    run_group(_tp2, 2)


def test_tensor_parallel_dits_with_ulysses_and_cfg():
    """ulysses 2 × tp 2 (Wan, FLUX, Qwen-Image, HunyuanVideo), then cfg 2 × tp 2 (Wan)."""
    with tempfile.TemporaryDirectory(prefix="dist-") as folder:  # the second layout's store
        run_group(_four_ranks, 4, f"file://{folder}/store")


def _randomized(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (scale if p.ndim >= 2 else 1.0))
    return model.eval()


def _encoders():
    """(name, model, forward kwargs, expected sharding counts) for tiny transformers text encoders."""
    import copy

    from tests.fixtures.tiny.qwen_image import build_text_encoder
    from transformers import (
        LlamaConfig,
        LlamaModel,
        Qwen2_5_VLForConditionalGeneration,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    t5 = dict(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, dropout_rate=0.0)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded second prompt
    qwen = build_text_encoder()  # 2 heads, 1 K/V head
    config = copy.deepcopy(qwen.config)
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 4, 2  # head dim 8
    config.text_config.rope_parameters["mrope_section"] = [1, 1, 2]  # halves of the head dim
    qwen_gqa = _randomized(Qwen2_5_VLForConditionalGeneration(config))
    llama = _randomized(LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2)))
    two = {"attention": 2, "mlp": 2, "whole": 0}
    return [
        ("t5", _randomized(T5EncoderModel(T5Config(feed_forward_proj="relu", **t5))), dict(input_ids=ids, attention_mask=mask), two),
        ("umt5", _randomized(UMT5EncoderModel(UMT5Config(feed_forward_proj="gated-gelu", **t5))), dict(input_ids=ids, attention_mask=mask), two),
        ("qwen2.5-vl", qwen, dict(input_ids=ids, attention_mask=mask), two),
        ("qwen2.5-vl gqa", qwen_gqa, dict(input_ids=ids, attention_mask=mask), two),
        ("llama", llama, dict(input_ids=ids, attention_mask=mask), two),
    ]


def _check_encoders(rank: int, state) -> None:
    from diffserve.worker.parallel.tensor import shard_text_encoder

    for name, model, kwargs, expect in _encoders():
        single = model(**kwargs, output_hidden_states=True).hidden_states[-1]
        assert shard_text_encoder(model, state) == expect, name
        _assert_own_storage(model)
        ours = model(**kwargs, output_hidden_states=True).hidden_states[-1]
        keep = kwargs["attention_mask"].bool()
        err = (ours - single)[keep].abs().max().item()
        assert err < 1e-4, f"{name} rank {rank}: max error {err}"
        assert single[keep].std() > 0.1


def test_pipeline_parts_found():
    from types import SimpleNamespace

    from diffserve.worker.parallel.tensor import text_encoders
    from diffserve.worker.models import dits
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8))
    wan = _cases()[0][1]
    pipeline = SimpleNamespace(transformer=wan, encoder=SimpleNamespace(text_encoder=t5), t5=t5, clip=clip)
    assert dits(pipeline) == [wan]
    assert text_encoders(pipeline) == [t5]  # once; CLIP (small, no supported layers) stays whole


def test_layout_with_tp():
    from diffserve.worker.models.wan import WanConfig, WanTransformer

    wan = WanTransformer(WanConfig.from_dict(WAN))
    assert plan_layout(4, [wan], cfg_capable=True, uses_cfg=True, enable_cfg_parallel=True, tp=2) == (ParallelDims(cfg=2, tp=2), [])
    _, problems = plan_layout(2, [_Unplanned(4)], cfg_capable=False, uses_cfg=False, tp=2)
    assert problems == ["_Unplanned has no tensor-parallel path; use --tp-size 1"]
    _, problems = plan_layout(4, [wan], cfg_capable=False, uses_cfg=False, ulysses=2, tp=2)
    assert problems == []
    _, problems = plan_layout(8, [wan], cfg_capable=False, uses_cfg=False, ulysses=2, tp=4)
    assert problems == ["4 attention heads do not divide by ulysses 2 × tp 4"]
