"""Every registered pipeline class × every layout the planner can produce on 2 and 4 ranks: a layout
that passes the start-time check only uses what the pipeline and its DiT's plan can do (CFG rows
split only where the pipeline splits them, tokens only where the family's plan has a sequence path,
heads only where it has a TP plan); everything else is refused at start with a message naming the
capability. FastWan (no CFG rows) with --enable-cfg-parallel splits the rows of batched requests (its
step goes through the forward hook the runtime wraps; tests/service/test_fastwan_parity.py checks the
split); image-conditioned Wan variants refuse it. CPU only, tiny DiT configs, no pipeline is loaded
(the planner reads the capabilities: a class's, or each Wan variant's)."""

from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch

from diffserve.worker.parallel.layout import plan_for
from diffserve.worker.parallel.plans import find_plan, has_sequence_path
from diffserve.worker.pipelines.base import Capabilities
from diffserve.worker.registry import PIPELINES
from test_sequence_parallel import FLUX, HUNYUAN, QWEN, WAN

# pipeline module -> the DiT family it serves (the DiT's module under diffserve.worker.models)
FAMILY = {"wan": "wan", "flux": "flux", "qwen_image": "qwen_image", "hunyuan_video": "hunyuan_video"}


def _tiny_dit(family: str) -> torch.nn.Module:
    from diffserve.worker.models.flux import FluxConfig, FluxTransformer
    from diffserve.worker.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer
    from diffserve.worker.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from diffserve.worker.models.wan import WanConfig, WanTransformer

    build = {"wan": (WanTransformer, WanConfig, WAN), "flux": (FluxTransformer, FluxConfig, FLUX),
             "qwen_image": (QwenImageTransformer, QwenImageConfig, QWEN),
             "hunyuan_video": (HunyuanVideoTransformer, HunyuanVideoConfig, HUNYUAN)}[family]
    with torch.device("meta"):
        return build[0](build[1].from_dict(build[2]))


def _wan_variants() -> dict[str, Capabilities]:
    """The Wan pipeline's capabilities depend on the checkpoint's variant: one case per kind."""
    from diffserve.worker.pipelines.wan import ImageConditioning, WanVariant

    def variant(image=ImageConditioning.NONE, dmd=False, experts=("transformer",)):
        return WanVariant(experts, None, image is ImageConditioning.FIRST_FRAME, image, image is ImageConditioning.CHANNELS,
                          image is ImageConditioning.CHANNELS, dmd)

    return {"WanPipeline[t2v]": variant().capabilities,
            "WanPipeline[a14b]": variant(experts=("transformer", "transformer_2")).capabilities,
            "WanPipeline[i2v]": variant(ImageConditioning.CHANNELS).capabilities,
            "WanPipeline[ti2v]": variant(ImageConditioning.FIRST_FRAME).capabilities,
            "WanPipeline[fastwan]": variant(dmd=True).capabilities}


def _pipelines() -> list[tuple[str, str, Capabilities]]:
    """(pipeline module, case name, capabilities) for every registered pipeline class."""
    found = {}
    for target in PIPELINES.values():
        module, _, name = target.partition(":")
        cls = getattr(importlib.import_module(f"diffserve.worker.pipelines.{module}"), name)
        if module == "wan":
            found.update({case: (module, case, caps) for case, caps in _wan_variants().items()})
        else:
            found[name] = (module, name, cls.capabilities)
    return sorted(found.values(), key=lambda item: item[1])


def _requests(num_gpus: int):
    """Every combination of the layout flags a user can give for `num_gpus` ranks (0: chosen by the planner)."""
    degrees = [d for d in (0, 1, 2, 4) if d <= num_gpus]
    for cfg, ulysses, ring, tp in itertools.product((False, True), degrees, degrees, degrees):
        yield dict(enable_cfg_parallel=cfg, ulysses=ulysses, ring=ring, tp=tp)


PIPELINE_CLASSES = _pipelines()


def test_every_registered_pipeline_is_covered():
    assert {module for module, _, _ in PIPELINE_CLASSES} <= set(FAMILY), "add the new pipeline module's DiT family to FAMILY"
    for _, _, caps in PIPELINE_CLASSES:
        assert isinstance(caps, Capabilities)


@pytest.mark.parametrize("num_gpus", [2, 4])
@pytest.mark.parametrize("module,name,caps", PIPELINE_CLASSES, ids=[name for _, name, _ in PIPELINE_CLASSES])
def test_layouts_honoured_or_refused_at_start(module, name, caps, num_gpus):
    model = _tiny_dit(FAMILY[module])
    pipeline = SimpleNamespace(capabilities=caps, card=SimpleNamespace(defaults=SimpleNamespace(guidance_scale=5.0)))
    accepted = 0
    for request in _requests(num_gpus):
        dims, problems = plan_for(pipeline, [model], num_gpus, **request)
        if problems:  # refused at start: every reason is a sentence
            assert all(isinstance(p, str) and len(p) > 20 for p in problems), problems
            if request["enable_cfg_parallel"] and not caps.cfg_parallel:
                assert any("no CFG-parallel path" in p for p in problems), (request, problems)
            continue
        accepted += 1
        assert dims.world_size == num_gpus, (request, dims)
        if request["enable_cfg_parallel"]:
            assert dims.cfg == 2, f"{name}: --enable-cfg-parallel accepted without splitting CFG rows: {dims}"
        if dims.cfg > 1:
            assert caps.cfg_parallel, f"{name}: {dims} accepted without a CFG-parallel path"
        if dims.ulysses > 1 or dims.ring > 1:
            assert has_sequence_path(model), f"{name}: {dims} accepted without a sequence-parallel plan"
        if dims.tp > 1:
            assert find_plan(model).tp, f"{name}: {dims} accepted without a tensor-parallel plan"
    assert accepted, f"{name} has no layout on {num_gpus} ranks"
    # the planner's own choice (no flags) always runs, and splits CFG rows only where they can be split
    dims, problems = plan_for(pipeline, [model], num_gpus)
    assert problems == [] and (dims.cfg == 1 or caps.cfg_parallel), (name, dims, problems)


def test_fastwan_with_cfg_parallel_splits_rows_and_image_wan_refuses_it():
    variants = _wan_variants()
    model = _tiny_dit("wan")
    fastwan = SimpleNamespace(capabilities=variants["WanPipeline[fastwan]"], card=SimpleNamespace(defaults=SimpleNamespace(guidance_scale=1.0)))
    dims, problems = plan_for(fastwan, [model], 2, enable_cfg_parallel=True)
    assert problems == [] and dims.cfg == 2, (dims, problems)
    i2v = SimpleNamespace(capabilities=variants["WanPipeline[i2v]"], card=SimpleNamespace(defaults=SimpleNamespace(guidance_scale=5.0)))
    _, problems = plan_for(i2v, [model], 2, enable_cfg_parallel=True)
    assert any("no CFG-parallel path; drop --enable-cfg-parallel" in p for p in problems), problems
