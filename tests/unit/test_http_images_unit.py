"""The Images API's pure parts (scheduler/http/images.py): size parsing, the request models, the
GenerationParams they make, seeds for n images, which model serves which endpoint, and errors named
in OpenAI's fields. No socket, no torch (FastAPI and pydantic only)."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors
from diffserve.scheduler.http.errors import HttpError, from_request_error
from diffserve.scheduler.http.images import (FIELDS, MAX_N, MAX_SEED, EditRequest, ImageRequest, check_model, check_supported,
                                             openai_message, parse_size, seeds, served_card, to_params, validated)


def test_parse_size():
    assert parse_size("1024x768") == (1024, 768)  # OpenAI's WxH: width first
    assert parse_size("32x48") == (32, 48)
    assert parse_size(None) is None and parse_size("auto") is None
    for bad in ("", "1024", "1024X768", "1024x", "x768", "0x32", "32x0", "-32x32", "32x32x1", " 32x32", "123456x32", "32.0x32", "auto "):
        with pytest.raises(HttpError) as refused:
            parse_size(bad)
        assert refused.value.status == 400 and refused.value.param == "size"


def test_request_model_fields():
    req = validated(ImageRequest, {"prompt": "a fox", "n": 3, "size": "32x32", "seed": 7, "num_inference_steps": 2, "user": "u", "quality": "hd", "style": "vivid"})
    assert (req.n, req.seed, req.num_inference_steps) == (3, 7, 2)
    for bad, field in (({"prompt": "a", "foo": 1}, "foo"), ({"n": 1}, "prompt"), ({"prompt": "a", "n": 0}, "n"), ({"prompt": "a", "n": MAX_N + 1}, "n"),
                       ({"prompt": "a", "seed": -1}, "seed"), ({"prompt": "a", "seed": MAX_SEED + 1}, "seed"),
                       ({"prompt": "a", "response_format": "png"}, "response_format"), ({"prompt": "a", "num_inference_steps": 2**40}, "num_inference_steps"),
                       ({"prompt": "a", "mask": "x"}, "mask")):  # mask is an /edits field only
        with pytest.raises(RequestValidationError) as refused:
            validated(ImageRequest, bad)
        assert refused.value.errors()[0]["loc"] == (field,)
    # form fields arrive as strings
    form = validated(EditRequest, {"prompt": "p", "n": "2", "seed": "5", "guidance_scale": "1.5", "stream": "false"})
    assert (form.n, form.seed, form.guidance_scale, form.stream) == (2, 5, 1.5, False)


@pytest.mark.parametrize("fields, param", [({"background": "transparent"}, "background"), ({"output_format": "jpeg"}, "output_format"),
                                           ({"stream": True}, "stream"), ({"partial_images": 2}, "partial_images"),
                                           ({"frame_count": 4}, "frame_count"), ({"mask": "<file m.png>"}, "mask"),
                                           ({"seed": MAX_SEED, "n": 2}, "seed")])
def test_unsupported_fields_refused(fields, param):
    with pytest.raises(HttpError) as refused:
        check_supported(validated(EditRequest, {"prompt": "p", **fields}))
    assert refused.value.status == 400 and refused.value.param == param


def test_supported_fields_accepted():
    check_supported(validated(EditRequest, {"prompt": "p", "background": "opaque", "output_format": "png", "stream": False, "partial_images": 0,
                                            "seed": MAX_SEED, "input_fidelity": "high", "moderation": "low", "output_compression": 50}))


def test_to_params():
    req = validated(ImageRequest, {"prompt": "a fox", "model": "wan", "size": "64x32", "seed": 3, "num_inference_steps": 2, "guidance_scale": 1.5,
                                   "negative_prompt": "blur", "priority": 5})
    params = to_params(req, [b"png-bytes"])
    assert (params.model, params.prompt, params.width, params.height, params.num_frames) == ("wan", "a fox", 64, 32, 1)
    assert params.output_format == pb.OUTPUT_FORMAT_PNG
    assert (params.seed, params.num_inference_steps, params.guidance_scale, params.negative_prompt) == (3, 2, 1.5, "blur")
    assert [image.data for image in params.images] == [b"png-bytes"]
    # unset stays unset: the model's defaults (and, for edits, the size derived from the image)
    bare = to_params(validated(ImageRequest, {"prompt": "a fox", "size": "auto"}))
    for name in ("width", "height", "seed", "num_inference_steps", "guidance_scale", "guidance_scale_2", "negative_prompt"):
        assert not bare.HasField(name), name
    assert bare.model == ""


def test_seeds():
    assert seeds(validated(ImageRequest, {"prompt": "p", "n": 3, "seed": 10})) == [10, 11, 12]
    assert seeds(validated(ImageRequest, {"prompt": "p", "seed": 0})) == [0]
    assert seeds(validated(ImageRequest, {"prompt": "p", "n": 2})) == [None, None]  # the engine picks each


def _card(name, task, *, image_required=False, max_images=0, max_num_frames=1) -> pb.Model:
    return pb.Model(name=name, task=task, limits=pb.ModelLimits(image_required=image_required, max_images=max_images, max_num_frames=max_num_frames))


def test_which_model_serves_which_endpoint():
    t2i, t2v = _card("flux", "text-to-image"), _card("wan", "text-to-video", max_num_frames=257)
    edit = _card("qwen-edit", "image-edit", image_required=True, max_images=1)
    i2v = _card("wan-i2v", "image-to-video", image_required=True, max_images=1, max_num_frames=257)
    ti2v = _card("ti2v", "text-image-to-video", max_images=1, max_num_frames=257)
    for card in (t2i, t2v, ti2v):
        check_model(card, "generations")
    check_model(edit, "edits")
    refusals = [(edit, "generations", "/v1/images/edits"), (i2v, "generations", "/v1/videos"), (t2i, "edits", "/v1/images/generations"),
                (t2v, "edits", "/v1/images/generations"), (i2v, "edits", "/v1/videos"), (ti2v, "edits", "/v1/videos")]
    for card, endpoint, points_to in refusals:
        with pytest.raises(HttpError) as refused:
            check_model(card, endpoint)
        assert refused.value.param == "model" and card.name in refused.value.message and points_to in refused.value.message
    assert served_card([t2i], None) == t2i and served_card([t2i], "") == t2i
    assert served_card([t2i, edit], None) is None and served_card([t2i, edit], "nope") is None
    assert served_card([t2i, edit], "qwen-edit") == edit


def test_errors_named_as_openai_names_them():
    for path, name in (("params.width", "size"), ("params.height", "size"), ("params.prompt", "prompt"), ("params.model", "model"),
                       ("params.images", "image"), ("params.images[0].data", "image"), ("params.num_inference_steps", "num_inference_steps"),
                       ("priority", "priority")):
        error = from_request_error(errors.invalid_argument([(path, "is wrong")]), FIELDS)
        assert (error.status, error.param) == (400, name), path
    assert openai_message("params.width: must be a multiple of 16 (got 33)") == "size (width): must be a multiple of 16 (got 33)"
    assert openai_message("params.images[0].data: not a readable image") == "image[0]: not a readable image"
    assert openai_message("params.prompt: must not be empty; params.seed: x") == "prompt: must not be empty; seed: x"
    full = from_request_error(errors.resource_exhausted("the queue is full (1 jobs waiting)", 2.5), FIELDS)
    assert full.status == 429 and full.headers["Retry-After"] == "3" and full.code == "QUEUE_FULL"
