"""Bad input → INVALID_ARGUMENT naming the field; a full queue → RESOURCE_EXHAUSTED with RetryInfo;
idempotent resubmission. Nothing crashes, and the next valid job succeeds."""

from __future__ import annotations

import grpc
import pytest

from diffserve.client import DiffserveError
from diffserve.v1 import generation_pb2 as pb
from jobs_util import LONG_JOB, final_event, npy_output

def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


VALID = dict(prompt="a cat", height=32, width=32, num_frames=1, num_inference_steps=2, output_format="npy")

BAD = [
    (dict(width=40), "params.width"),
    (dict(height=20), "params.height"),
    (dict(num_frames=4), "params.num_frames"),
    (dict(num_frames=0), "params.num_frames"),
    (dict(num_inference_steps=0), "params.num_inference_steps"),
    (dict(num_inference_steps=10_000), "params.num_inference_steps"),
    (dict(height=8192, width=8192), "params.height"),
    (dict(height=8192, width=8192), "params.width"),
    (dict(prompt=""), "params.prompt"),
    (dict(prompt="   "), "params.prompt"),
    (dict(model="no-such-model"), "params.model"),
    (dict(guidance_scale=float("nan")), "params.guidance_scale"),
    (dict(guidance_scale=-1.0), "params.guidance_scale"),
    (dict(fps=0), "params.fps"),
    (dict(num_frames=5, output_format="png"), "params.output_format"),
    (dict(images=[tiny_png()]), "params.images"),  # a valid image, but the T2V model takes none
    (dict(images=["http://203.0.113.7/never-fetched.png"]), "params.images"),  # refused before any fetch
    (dict(output_format=99), "params.output_format"),
    (dict(prompt="a\0b"), "params.prompt"),
    (dict(prompt="\u200b\u200d\u2060"), "params.prompt"),  # only invisible characters
    (dict(prompt="x" * 80_001), "params.prompt"),
    (dict(client_request_id="k" * 129), "client_request_id"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_names_the_field(wan_server, change, field):
    with pytest.raises(DiffserveError) as info:
        wan_server.client.submit(**{**VALID, **change})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in info.value.field_violations], info.value.field_violations
    assert field in info.value.message


def test_bad_input_through_generate_and_server_goes_on(wan_server):
    with pytest.raises(DiffserveError) as info:
        list(wan_server.client.generate(**{**VALID, "width": 33}))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert npy_output(wan_server.client, wan_server.client.submit(**VALID).id).shape == (1, 32, 32, 3)


def test_unknown_job(wan_server):
    for call in (wan_server.client.get, wan_server.client.cancel, wan_server.client.download):
        with pytest.raises(DiffserveError) as info:
            call("0" * 32)
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_client_request_id_is_idempotent(wan_server):
    client = wan_server.client
    first = client.submit(client_request_id="req-42", **VALID)
    again = client.submit(client_request_id="req-42", **VALID)
    assert first.id == again.id
    assert client.wait(first.id).state == pb.JOB_STATE_SUCCEEDED


def test_defaults_come_from_the_model(wan_server):
    (model,) = wan_server.client.list_models()
    assert (model.defaults.height, model.defaults.width, model.defaults.num_frames) == (480, 832, 81)
    assert model.defaults.num_inference_steps == 50 and model.defaults.guidance_scale == pytest.approx(5.0)
    assert model.defaults.sampler == "UniPCMultistepScheduler" and model.defaults.flow_shift == pytest.approx(3.0)
    job = wan_server.client.submit(prompt="defaults", num_inference_steps=1)
    assert (job.params.height, job.params.width, job.params.num_frames) == (480, 832, 81)
    assert job.params.output_format == pb.OUTPUT_FORMAT_MP4 and job.params.HasField("seed")
    wan_server.client.cancel(job.id)


def test_queue_full_is_resource_exhausted(tiny_wan, start_server):
    server = start_server(tiny_wan, "--max-queue", "1", "--max-resident", "1")
    client = server.client
    running = client.submit(**LONG_JOB)
    queued = client.submit(**LONG_JOB)
    with pytest.raises(DiffserveError) as info:
        client.submit(**LONG_JOB)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_delay_s and info.value.retry_delay_s > 0
    for job in (queued, running):
        client.cancel(job.id)
        assert final_event(client, job.id).WhichOneof("event") == "cancelled"
    assert npy_output(client, client.submit(**VALID).id).shape == (1, 32, 32, 3)
