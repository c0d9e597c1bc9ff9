"""Every registered pipeline class × every layout the planner can produce on 2 and 4 ranks: a layout
that passes the start-time check only uses what the pipeline and its DiT's plan can do (CFG rows
split only where the pipeline splits them, tokens only where the family's plan has a sequence path,
heads only where it has a TP plan); everything else is refused at start with a message naming the
capability. FastWan (no CFG rows) with --enable-cfg-parallel is refused. CPU only, tiny DiT configs,
no pipeline is loaded (the planner reads the pipeline class's `capabilities`)."""

from __future__ import annotations

import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch

from diffserve.worker.parallel.layout import plan_for
from diffserve.worker.parallel.plans import find_plan, has_sequence_path
from diffserve.worker.pipelines.base import Capabilities
from diffserve.worker.registry import PIPELINES, REFINED
from test_sequence_parallel import FLUX, HUNYUAN, QWEN, WAN

# pipeline module -> the DiT family it serves (the DiT's module under diffserve.worker.models)
FAMILY = {"wan_t2v": "wan", "wan_i2v": "wan", "fastwan": "wan", "flux": "flux", "qwen_image": "qwen_image",
          "hunyuan_video": "hunyuan_video"}


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


def _pipelines() -> list[tuple[str, type]]:
    found = {}
    for target in [*PIPELINES.values(), *REFINED.values()]:
        module, _, name = target.partition(":")
        found[target] = (module, getattr(importlib.import_module(f"diffserve.worker.pipelines.{module}"), name))
    return sorted(found.values(), key=lambda item: item[1].__name__)


def _requests(num_gpus: int):
    """Every combination of the layout flags a user can give for `num_gpus` ranks (0: chosen by the planner)."""
    degrees = [d for d in (0, 1, 2, 4) if d <= num_gpus]
    for cfg, ulysses, ring, tp in itertools.product((False, True), degrees, degrees, degrees):
        yield dict(enable_cfg_parallel=cfg, ulysses=ulysses, ring=ring, tp=tp)


PIPELINE_CLASSES = _pipelines()


def test_every_registered_pipeline_is_covered():
    assert {module for module, _ in PIPELINE_CLASSES} <= set(FAMILY), "add the new pipeline module's DiT family to FAMILY"
    for _, cls in PIPELINE_CLASSES:
        assert isinstance(cls.capabilities, Capabilities), cls


@pytest.mark.parametrize("num_gpus", [2, 4])
@pytest.mark.parametrize("module,cls", PIPELINE_CLASSES, ids=[cls.__name__ for _, cls in PIPELINE_CLASSES])
def test_layouts_honoured_or_refused_at_start(module, cls, num_gpus):
    caps: Capabilities = cls.capabilities
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
            assert dims.cfg == 2, f"{cls.__name__}: --enable-cfg-parallel accepted without splitting CFG rows: {dims}"
        if dims.cfg > 1:
            assert caps.cfg_parallel, f"{cls.__name__}: {dims} accepted without a CFG-parallel path"
        if dims.ulysses > 1 or dims.ring > 1:
            assert has_sequence_path(model), f"{cls.__name__}: {dims} accepted without a sequence-parallel plan"
        if dims.tp > 1:
            assert find_plan(model).tp, f"{cls.__name__}: {dims} accepted without a tensor-parallel plan"
    assert accepted, f"{cls.__name__} has no layout on {num_gpus} ranks"
    # the planner's own choice (no flags) always runs, and splits CFG rows only where they can be split
    dims, problems = plan_for(pipeline, [model], num_gpus)
    assert problems == [] and (dims.cfg == 1 or caps.cfg_parallel), (cls.__name__, dims, problems)


def test_fastwan_with_cfg_parallel_is_refused():
    from diffserve.worker.pipelines.fastwan import FastWanPipeline

    pipeline = SimpleNamespace(capabilities=FastWanPipeline.capabilities, card=SimpleNamespace(defaults=SimpleNamespace(guidance_scale=1.0)))
    _, problems = plan_for(pipeline, [_tiny_dit("wan")], 2, enable_cfg_parallel=True)
    assert any("no CFG-parallel path; drop --enable-cfg-parallel" in p for p in problems), problems
