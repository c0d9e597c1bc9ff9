"""The Images API's pure parts (scheduler/http/images.py): size parsing, the request models, the
GenerationParams they make, seeds for n images, which model serves which endpoint, and errors named
in OpenAI's fields. No socket, no torch (FastAPI and pydantic only)."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler import errors
from diffserve.scheduler.http.errors import HttpError, from_request_error
from diffserve.scheduler.http.models import served_card
from diffserve.scheduler.http.images import (FIELDS, MAX_N, MAX_SEED, EditRequest, ImageRequest, check_model, check_supported,
                                             openai_message, parse_size, seeds, to_params, validated)


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


# ---- the call over a fake engine: all or nothing, one failure ends the call, a hang-up cancels -----

class FakeJob:
    def __init__(self, params: pb.GenerationParams, outcome: str):
        self.id = f"job{params.seed}"
        self.params = params
        self.outcome = outcome  # "ok", "fail" or "never" (runs until cancelled)
        self.polls = 0
        self.cancelled = None
        self.state = pb.JOB_STATE_RUNNING
        self.error = None
        self.artifact = pb.Artifact(id=self.id, width=32, height=16)
        self.events = []

    @property
    def done(self) -> bool:
        return self.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

    async def wait_change(self, seen, timeout=None):
        import asyncio

        await asyncio.sleep(0)
        self.polls += 1
        if self.polls >= 2 and self.outcome == "ok":
            self.state = pb.JOB_STATE_SUCCEEDED
        elif self.polls >= 2 and self.outcome == "fail":
            self.state, self.error = pb.JOB_STATE_FAILED, errors.internal("the worker broke")


class FakeDoor:
    def __init__(self, outcomes: list[str], refuse_at: int | None = None):
        from types import SimpleNamespace

        self.outcomes, self.refuse_at, self.jobs = list(outcomes), refuse_at, []
        self.engine = SimpleNamespace(list_models=lambda: [pb.Model(name="m", task="text-to-image", limits=pb.ModelLimits(max_num_frames=1))],
                                      config=SimpleNamespace(retry_after_s=2.0))

    async def submit(self, params, principal, **kwargs):
        if len(self.jobs) == self.refuse_at:
            raise errors.resource_exhausted("the queue is full (2 jobs waiting)", 2.0)
        self.jobs.append(FakeJob(params, self.outcomes[len(self.jobs)]))
        return self.jobs[-1], True

    def cancel(self, job, status):
        if not job.done:
            job.cancelled, job.state = status, pb.JOB_STATE_CANCELLED

    def cancel_bound(self, job, created):
        self.cancel(job, errors.cancelled())

    async def artifact_bytes(self, artifact):
        yield artifact.id.encode()


class FakeRequest:
    def __init__(self, door: FakeDoor, gone: bool = False):
        from types import SimpleNamespace

        from starlette.datastructures import URL

        self.app = SimpleNamespace(state=SimpleNamespace(door=door))
        self.gone = gone
        self.base_url = URL("http://example.test:8000/")

    async def is_disconnected(self) -> bool:
        return self.gone


def _call(door: FakeDoor, gone: bool = False, **fields):
    import asyncio

    from diffserve.scheduler.auth import ANONYMOUS
    from diffserve.scheduler.http.images import _run

    req = validated(ImageRequest, {"prompt": "a fox", "seed": 1, **fields})
    return asyncio.run(_run(FakeRequest(door, gone), req, ANONYMOUS, "generations"))


def test_call_answers_every_image():
    door = FakeDoor(["ok", "ok"])
    answer = _call(door, n=2)
    assert [item["seed"] for item in answer["data"]] == [1, 2] and answer["size"] == "32x16"
    assert [item["b64_json"] for item in answer["data"]] == ["am9iMQ==", "am9iMg=="]  # base64 of the artifact bytes "job1", "job2"
    (item,) = _call(FakeDoor(["ok"]), response_format="url")["data"]
    assert item == {"url": "http://example.test:8000/v1/jobs/job1/content", "job_id": "job1", "seed": 1}


def test_a_refused_submit_cancels_the_jobs_queued_before_it():
    door = FakeDoor(["never", "never", "never"], refuse_at=2)
    with pytest.raises(HttpError) as refused:
        _call(door, n=3)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "2"
    assert len(door.jobs) == 2 and all(job.state == pb.JOB_STATE_CANCELLED for job in door.jobs)


def test_a_failed_job_ends_the_call_and_cancels_the_others():
    door = FakeDoor(["ok", "fail", "never"])
    with pytest.raises(HttpError) as failed:
        _call(door, n=3)
    assert failed.value.status == 500 and "the worker broke" in failed.value.message
    assert [job.state for job in door.jobs] == [pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED]


def test_a_client_gone_cancels_every_job():
    door = FakeDoor(["never", "never"])
    with pytest.raises(HttpError) as gone:
        _call(door, gone=True, n=2)
    assert gone.value.status == 499
    assert all(job.state == pb.JOB_STATE_CANCELLED for job in door.jobs)
