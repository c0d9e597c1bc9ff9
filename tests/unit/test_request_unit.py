"""The worker's resolved request (scheduler/requests.py), the stage mapping of RunStage and the
model card conversion (scheduler/cards.py). No torch, no sockets."""

from __future__ import annotations

import pytest

from diffserve.scheduler.cards import public_model
from diffserve.scheduler.requests import worker_request, worker_stage
from diffserve.scheduler.validation import resolve_params
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

LIMITS = pb.ModelLimits(size_multiple=16, max_height=2048, max_width=2048, max_pixels=1920 * 1088, frame_step=4,
                        max_num_frames=257, max_num_inference_steps=1000, prompt_required=True, max_images=1)


def model(kind, experts=1, guidance=5.0, guidance_2=0.0) -> pb.Model:
    return pb.Model(
        name="m", guidance_kind=kind, num_experts=experts, limits=LIMITS,
        defaults=pb.ModelDefaults(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=guidance,
                                  guidance_scale_2=guidance_2, fps=16, negative_prompt="neg"),
    )


def request(card: pb.Model, **fields) -> wpb.Request:
    return worker_request(resolve_params(pb.GenerationParams(prompt="a cat", **fields), card), card)


def test_every_field_resolved():
    r = request(model(pb.GUIDANCE_KIND_CFG), seed=7, images=[pb.ImageInput(data=b"png bytes")])
    assert (r.prompt, r.negative_prompt, r.height, r.width, r.num_frames, r.num_inference_steps, r.seed) == ("a cat", "neg", 480, 832, 81, 50, 7)
    assert list(r.images) == [b"png bytes"] and r.embedded_guidance == 0


@pytest.mark.parametrize("kind", [pb.GUIDANCE_KIND_CFG, pb.GUIDANCE_KIND_CFG_NORM_RESCALE])
def test_cfg_scales_single_expert(kind):
    assert list(request(model(kind)).cfg_scales) == [5.0]
    assert list(request(model(kind), guidance_scale=7.5).cfg_scales) == [7.5]
    # CFG runs only above 1: no unconditional row at <= 1.
    assert list(request(model(kind), guidance_scale=1.0).cfg_scales) == []
    assert list(request(model(kind), guidance_scale=0.0).cfg_scales) == []


def test_cfg_scales_two_experts():
    wan22 = model(pb.GUIDANCE_KIND_CFG, experts=2, guidance=4.0, guidance_2=3.0)
    assert list(request(wan22).cfg_scales) == [4.0, 3.0]  # the card's guidance_scale_2
    assert list(request(wan22, guidance_scale=5.0, guidance_scale_2=2.5).cfg_scales) == [5.0, 2.5]
    assert list(request(wan22, guidance_scale=1.0).cfg_scales) == []
    # No card default (Wan2.2 I2V-A14B): the low-noise expert takes guidance_scale, as in diffusers.
    i2v = model(pb.GUIDANCE_KIND_CFG, experts=2, guidance=5.0)
    assert list(request(i2v).cfg_scales) == [5.0, 5.0]
    assert list(request(i2v, guidance_scale=6.0).cfg_scales) == [6.0, 6.0]


def test_embedded_guidance_is_raw_and_adds_no_row():
    flux = model(pb.GUIDANCE_KIND_EMBEDDED, guidance=3.5)
    flux.defaults.negative_prompt = ""
    r = request(flux)
    assert r.embedded_guidance == pytest.approx(3.5) and list(r.cfg_scales) == []
    assert request(flux, guidance_scale=6.0).embedded_guidance == pytest.approx(6.0)


def test_no_guidance():
    fastwan = model(pb.GUIDANCE_KIND_NONE, guidance=1.0)
    fastwan.defaults.negative_prompt = ""
    r = request(fastwan)
    assert list(r.cfg_scales) == [] and r.embedded_guidance == 0


def test_run_stage_stages():
    assert worker_stage(pb.STAGE_ENCODE) == wpb.WORKER_STAGE_ENCODE
    assert worker_stage(pb.STAGE_PREPARE) == wpb.WORKER_STAGE_PREPARE
    assert worker_stage(pb.STAGE_DECODE) == wpb.WORKER_STAGE_DECODE
    for stage in (pb.STAGE_DENOISE, pb.STAGE_SAVE, pb.STAGE_UNSPECIFIED):
        with pytest.raises(ValueError):
            worker_stage(stage)


# ---- model cards ----

@pytest.mark.parametrize("public,internal", [
    (pb.ModelDefaults, wpb.ModelDefaults), (pb.ModelLimits, wpb.ModelLimits),
])
def test_card_twins_have_the_same_fields(public, internal):
    fields = lambda t: {(f.name, f.number, f.type) for f in t.DESCRIPTOR.fields}  # noqa: E731
    assert fields(public) == fields(internal)


def test_guidance_kind_twins_have_the_same_values():
    assert dict(pb.GuidanceKind.items()) == dict(wpb.GuidanceKind.items())


def test_public_model_from_card():
    card = wpb.ModelCard(
        name="Wan2.2-T2V-A14B", family="wan2.2", task="text-to-video", guidance_kind=wpb.GUIDANCE_KIND_CFG, num_experts=2,
        defaults=wpb.ModelDefaults(height=720, width=1280, num_frames=81, num_inference_steps=40, guidance_scale=4.0, fps=16,
                                   negative_prompt="neg", sampler="UniPC", flow_shift=12.0, guidance_scale_2=3.0),
        limits=wpb.ModelLimits(size_multiple=16, max_height=2048, max_width=2048, max_pixels=1920 * 1088, frame_step=4,
                               max_num_frames=257, max_num_inference_steps=1000, prompt_required=True, max_images=0),
    )
    m = public_model(card)
    assert (m.name, m.family, m.task, m.guidance_kind, m.num_experts) == ("Wan2.2-T2V-A14B", "wan2.2", "text-to-video", pb.GUIDANCE_KIND_CFG, 2)
    assert m.defaults.SerializeToString() == card.defaults.SerializeToString()
    assert m.limits.SerializeToString() == card.limits.SerializeToString()
    assert m.state == pb.SERVING_STATE_UNSPECIFIED and not m.workers
    for kind in wpb.GuidanceKind.values():
        assert pb.GuidanceKind.Name(public_model(wpb.ModelCard(guidance_kind=kind)).guidance_kind) == wpb.GuidanceKind.Name(kind)
    assert public_model(wpb.ModelCard(name="old")).num_experts == 1  # a card that does not say has one expert


def test_worker_card_round_trip():
    """A pipeline's card (public type, still) → the worker's Hello card → the public card again."""
    from diffserve.worker.card import model_card

    class Pipeline:
        card = pb.Model(name="wan", family="wan2.2", task="image-to-video", guidance_kind=pb.GUIDANCE_KIND_CFG,
                        defaults=pb.ModelDefaults(height=480, width=832, num_frames=81, guidance_scale=5.0, sampler="UniPC"),
                        limits=pb.ModelLimits(size_multiple=16, max_pixels=1920 * 1088, image_required=True, max_images=1))
        experts = ["transformer", "transformer_2"]

    card = model_card(Pipeline())
    assert card.num_experts == 2
    again = public_model(card)
    again.num_experts = 0
    assert again == Pipeline.card
    Pipeline.experts = ["transformer", None]  # Wan I2V without transformer_2
    assert model_card(Pipeline()).num_experts == 1
    del Pipeline.experts  # every other family
    assert model_card(Pipeline()).num_experts == 1


# ---- step caching ----

def test_step_cache_reaches_the_worker_request_and_is_checked_against_the_card():
    from diffserve.scheduler.errors import RequestError

    card = model(pb.GUIDANCE_KIND_CFG)
    assert not request(card).HasField("cache")  # unset: exact
    with pytest.raises(RequestError, match="params.cache.policy.*offers no step-caching policy 'first-block'"):
        request(card, cache=pb.StepCache(policy="first-block", threshold=0.1))
    card.cache_policies.append("first-block")
    r = request(card, cache=pb.StepCache(policy="first-block", threshold=0.1))
    assert (r.cache.policy, round(r.cache.threshold, 6)) == ("first-block", 0.1)
    for threshold in (0.0, -1.0, 11.0, float("nan")):
        with pytest.raises(RequestError, match="params.cache.threshold"):
            request(card, cache=pb.StepCache(policy="first-block", threshold=threshold))
    with pytest.raises(RequestError, match="params.cache.policy.*needs a policy"):
        request(card, cache=pb.StepCache(threshold=0.1))
    with pytest.raises(RequestError, match="offers no step-caching policy 'teacache'"):
        request(card, cache=pb.StepCache(policy="teacache", threshold=0.1))


def test_cards_carry_packing_cache_policies_and_quantizations_to_the_public_model():
    card = wpb.ModelCard(name="m", packs_mixed_shapes=True, cache_policies=["first-block"], quantizations=["fp8", "fp8-attention"])
    m = public_model(card)
    assert m.packs_mixed_shapes and list(m.cache_policies) == ["first-block"]
    assert list(m.quantizations) == ["fp8", "fp8-attention"]


# ---- per-request LoRA ----

def test_lora_adapters_reach_the_worker_request_with_their_scale_and_are_checked_against_the_card():
    from diffserve.scheduler.errors import RequestError

    card = model(pb.GUIDANCE_KIND_CFG)
    assert list(request(card).loras) == []
    with pytest.raises(RequestError, match=r"params.loras\[0\].name.*takes no LoRA adapters"):
        request(card, loras=[pb.LoraAdapter(name="a")])
    card.lora_adapters.extend(["a", "b"])
    r = request(card, loras=[pb.LoraAdapter(name="a"), pb.LoraAdapter(name="b", scale=0.5)])
    assert [(x.name, x.scale) for x in r.loras] == [("a", 1.0), ("b", 0.5)]  # unset: 1.0
    assert request(card, loras=[pb.LoraAdapter(name="a", scale=0.0)]).loras[0].scale == 0.0  # set to 0: kept
    resolved = resolve_params(pb.GenerationParams(prompt="p", loras=[pb.LoraAdapter(name="a")]), card)
    assert resolved.loras[0].HasField("scale") and resolved.loras[0].scale == 1.0  # the job shows what ran
    with pytest.raises(RequestError, match=r"params.loras\[1\].name.*no LoRA adapter 'zz' \(offered: a, b\)"):
        request(card, loras=[pb.LoraAdapter(name="a"), pb.LoraAdapter(name="zz")])
    with pytest.raises(RequestError, match=r"params.loras\[1\].name.*'a' is named twice"):
        request(card, loras=[pb.LoraAdapter(name="a"), pb.LoraAdapter(name="a", scale=0.5)])
    for scale in (4.5, -5.0, float("inf"), float("nan")):
        with pytest.raises(RequestError, match=r"params.loras\[0\].scale: must be a finite number from -4 to 4"):
            request(card, loras=[pb.LoraAdapter(name="a", scale=scale)])
    assert request(card, loras=[pb.LoraAdapter(name="a", scale=-4.0)]).loras[0].scale == -4.0


def test_cards_carry_lora_adapters_to_the_public_model():
    m = public_model(wpb.ModelCard(name="m", lora_adapters=["a", "b"]))
    assert list(m.lora_adapters) == ["a", "b"]


def cache_card() -> pb.Model:
    card = model(pb.GUIDANCE_KIND_CFG)
    card.cache_policies.extend(["first-block", "taylorseer", "mag"])
    return card


def test_the_scheduler_fills_each_policys_defaults_and_the_worker_gets_every_knob():
    from diffserve.scheduler.validation import resolve_params

    card = cache_card()  # 50 steps by default
    r = request(card, cache=pb.StepCache(policy="taylorseer"))
    assert (r.cache.interval, r.cache.max_order, r.cache.warmup_steps) == (5, 1, 3)  # diffusers' TaylorSeerCacheConfig
    assert not r.cache.HasField("cooldown_step") and r.cache.threshold == 0
    r = request(card, cache=pb.StepCache(policy="taylorseer", interval=2, max_order=2, warmup_steps=1, cooldown_step=40))
    assert (r.cache.interval, r.cache.max_order, r.cache.warmup_steps, r.cache.cooldown_step) == (2, 2, 1, 40)
    r = request(card, num_inference_steps=28, cache=pb.StepCache(policy="mag", threshold=0.06, mag_ratios=[1.0, 1.02, 0.99]))
    # diffusers' MagCacheConfig: max_skip_steps 3, retention_ratio 0.2 -> int(0.2 * 28 + 0.5) = 6 steps
    assert (r.cache.max_skip_steps, r.cache.warmup_steps) == (3, 6)
    assert [round(x, 6) for x in r.cache.mag_ratios] == [1.0, 1.02, 0.99]
    r = request(card, cache=pb.StepCache(policy="mag", threshold=0.1, warmup_steps=0, max_skip_steps=5, mag_ratios=[1.0]))
    assert r.cache.HasField("warmup_steps") and (r.cache.warmup_steps, r.cache.max_skip_steps) == (0, 5)  # 0 set is 0
    # Job.params shows the values used.
    out = resolve_params(pb.GenerationParams(prompt="a cat", cache=pb.StepCache(policy="taylorseer")), card)
    assert (out.cache.interval, out.cache.warmup_steps) == (5, 3)
    first_block = request(card, cache=pb.StepCache(policy="first-block", threshold=0.1)).cache
    assert [f.name for f, _ in first_block.ListFields()] == ["policy", "threshold"]  # it has no other knob


@pytest.mark.parametrize("cache,field,why", [
    (dict(policy="first-block", threshold=0.1, interval=3), "interval", "policy first-block does not use it"),
    (dict(policy="taylorseer", threshold=0.1), "threshold", "policy taylorseer does not use it"),
    (dict(policy="taylorseer", interval=-1), "interval", "from 1 to 1000"),
    (dict(policy="taylorseer", max_order=5), "max_order", "from 1 to 4"),
    (dict(policy="taylorseer", warmup_steps=0), "warmup_steps", "from 1 to 50"),
    (dict(policy="taylorseer", cooldown_step=51), "cooldown_step", "from 1 to 50"),
    (dict(policy="taylorseer", mag_ratios=[1.0]), "mag_ratios", "does not use it"),
    (dict(policy="mag", threshold=0.06), "mag_ratios", "magnitude ratios, 1 to 1000"),
    (dict(policy="mag", mag_ratios=[1.0]), "threshold", "more than 0"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0, float("inf")]), "mag_ratios", "finite numbers > 0"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0, 0.0]), "mag_ratios", "finite numbers > 0"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0] * 1001), "mag_ratios", "1 to 1000"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0], max_skip_steps=-2), "max_skip_steps", "from 1 to 1000"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0], warmup_steps=51), "warmup_steps", "from 0 to 50"),
    (dict(policy="mag", threshold=0.06, mag_ratios=[1.0], max_order=2), "max_order", "does not use it"),
    (dict(interval=3), "policy", "with interval set needs a policy"),
])
def test_a_bad_step_cache_is_refused_naming_the_field(cache, field, why):
    from diffserve.scheduler.errors import RequestError

    with pytest.raises(RequestError, match=f"params.cache.{field}: .*{why}"):
        request(cache_card(), cache=pb.StepCache(**cache))


def test_the_worker_step_cache_is_the_public_one_field_for_field():
    """scheduler/requests.py copies it by its wire bytes: names, numbers, types and presence must agree."""
    def fields(message):
        return [(f.name, f.number, f.type, f.is_repeated, f.has_presence) for f in message.DESCRIPTOR.fields]

    assert fields(pb.StepCache) == fields(wpb.StepCache)


def test_a_step_cache_in_http_json_reaches_the_worker():
    """POST /v1/jobs parses its body as a SubmitJobRequest in JSON (scheduler/http/jobs.py)."""
    from google.protobuf import json_format

    body = '{"params": {"prompt": "a cat", "cache": {"policy": "mag", "threshold": 0.06, "max_skip_steps": 2, "mag_ratios": [1.0, 1.02]}}}'
    params = json_format.Parse(body, pb.SubmitJobRequest()).params
    r = worker_request(resolve_params(params, cache_card()), cache_card())
    assert (r.cache.policy, r.cache.max_skip_steps, r.cache.warmup_steps, len(r.cache.mag_ratios)) == ("mag", 2, 10, 2)
