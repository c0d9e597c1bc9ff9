"""The Videos API's pure logic (scheduler/http/video_objects.py): seconds → frames, size, the create
body's fields, progress, the Video object; and JobTable.remove (DELETE of a finished video)."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import timestamp_pb2

from diffserve.scheduler import errors
from diffserve.scheduler.http.video_objects import (FieldError, frames_for, image_input, last_stage, parse_seconds, parse_size,
                                                    progress, seconds_text, video_object, video_request)
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import Event
from diffserve.v1 import generation_pb2 as pb

WAN = pb.Model(name="wan", task="text-to-video", defaults=pb.ModelDefaults(fps=16, num_frames=81),
               limits=pb.ModelLimits(frame_step=4, max_num_frames=257, max_images=0))
I2V = pb.Model(name="i2v", task="image-to-video", defaults=pb.ModelDefaults(fps=16, num_frames=81),
               limits=pb.ModelLimits(frame_step=4, max_num_frames=81, max_images=1, image_required=True))
FLUX = pb.Model(name="flux", task="text-to-image", defaults=pb.ModelDefaults(fps=16, num_frames=1), limits=pb.ModelLimits(frame_step=1, max_num_frames=1))


@pytest.mark.parametrize("seconds, fps, step, frames", [
    (4, 16, 4, 65),  # 64 → the nearest 4k+1
    (5, 16, 4, 81),  # exactly 4k+1
    (0.25, 16, 4, 5),
    (1 / 16, 16, 4, 1),  # one frame's worth
    (0.001, 16, 4, 1),  # at least 1
    (2, 24, 4, 49),  # HunyuanVideo's fps
    (0.1875, 16, 4, 5),  # 3 frames: 2 steps of 4 above 1 → halfway → rounds up
    (3, 10, 1, 30),  # frame_step 1: seconds × fps
])
def test_seconds_to_frames(seconds, fps, step, frames):
    assert frames_for(seconds, fps, step, 257) == frames
    assert (frames - 1) % step == 0


def test_seconds_past_the_models_longest_clip_is_refused():
    with pytest.raises(FieldError) as exc:
        frames_for(20, 16, 4, 257)
    assert exc.value.param == "seconds" and "257" in str(exc.value) and "16.0625 s" in str(exc.value)


@pytest.mark.parametrize("value", ["", "x", "0", "-1", "nan", "inf", "1e9", True, None, [4]])
def test_bad_seconds(value):
    with pytest.raises(FieldError) as exc:
        parse_seconds(value)
    assert exc.value.param == "seconds"


def test_seconds_and_size_parse():
    assert parse_seconds("4") == 4.0 and parse_seconds(8) == 8.0 and parse_seconds("0.5") == 0.5
    assert parse_size("832x480") == (832, 480) and parse_size(" 32X64 ") == (32, 64)
    for bad in ("832*480", "x480", "0x32", "32", 32, "1234567x2"):
        with pytest.raises(FieldError) as exc:
            parse_size(bad)
        assert exc.value.param == "size"
    assert seconds_text(65, 16) == "4.0625" and seconds_text(81, 16) == "5.0625" and seconds_text(48, 16) == "3"


def test_create_body_maps_to_params():
    request = video_request({"prompt": "a fox", "model": "wan", "seconds": "4", "size": "832x480", "seed": "7",
                             "num_inference_steps": "30", "guidance_scale": "4.5", "negative_prompt": "blur", "priority": "5",
                             "client_request_id": "k"}, [WAN])
    p = request.params
    assert (p.prompt, p.model, p.width, p.height, p.num_frames, p.seed, p.num_inference_steps) == ("a fox", "wan", 832, 480, 65, 7, 30)
    assert p.guidance_scale == 4.5 and p.negative_prompt == "blur" and p.output_format == pb.OUTPUT_FORMAT_MP4
    assert request.priority == 5 and request.client_request_id == "k" and request.fields["params.num_frames"] == "seconds"
    # JSON numbers too; fps changes the frame count; no seconds: the model's default frames (unset here)
    assert video_request({"prompt": "x", "seconds": 2, "fps": 8, "seed": 2**64 - 1}, [WAN]).params.num_frames == 17
    plain = video_request({"prompt": "x"}, [WAN]).params
    assert not plain.HasField("num_frames") and not plain.HasField("width") and not plain.HasField("seed")
    # num_frames directly; an engine error on it then names num_frames
    direct = video_request({"prompt": "x", "num_frames": "9"}, [WAN])
    assert direct.params.num_frames == 9 and direct.fields["params.num_frames"] == "num_frames"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "seed": "seven"}, "seed"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 2**31}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "seconds": "4", "num_frames": 9}, "num_frames"),
    ({"prompt": "x", "fps": 0, "seconds": "1"}, "fps"),
    ({"prompt": "x", "input_reference": b"png"}, "input_reference"),  # text-only model
    ({"prompt": "x", "model": "flux"}, "model"),  # makes images, not videos
])
def test_bad_create_bodies_name_the_field(body, param):
    with pytest.raises(FieldError) as exc:
        video_request(body, [WAN, FLUX] if body.get("model") == "flux" else [WAN])
    assert exc.value.param == param


def test_input_reference_forms():
    assert video_request({"prompt": "x", "input_reference": b"\x89PNG"}, [I2V]).params.images[0].data == b"\x89PNG"
    assert image_input({"image_url": "https://example.com/a.png"}).url == "https://example.com/a.png"
    assert image_input("https://example.com/a.png").url == "https://example.com/a.png"
    data_url = "data:image/png;base64," + base64.b64encode(b"\x89PNGdata").decode()
    assert image_input({"image_url": data_url}).data == b"\x89PNGdata"
    for bad, param in (({"file_id": "file-1"}, "input_reference.file_id"), ({"url": "x"}, "input_reference.url"),
                       ("data:image/png;base64,@@@", "input_reference"), (b"", "input_reference"), (3, "input_reference")):
        with pytest.raises(FieldError) as exc:
            image_input(bad)
        assert exc.value.param == param
    # an unknown model: no conversion here (the engine refuses the model, naming it)
    assert not video_request({"prompt": "x", "model": "nope", "seconds": "4"}, [WAN]).params.HasField("num_frames")


def test_progress_is_monotonic_over_a_jobs_life():
    total = 8
    life = [(pb.JOB_STATE_QUEUED, pb.STAGE_UNSPECIFIED, 0), (pb.JOB_STATE_RUNNING, pb.STAGE_ENCODE, 0),
            (pb.JOB_STATE_RUNNING, pb.STAGE_PREPARE, 0)]
    life += [(pb.JOB_STATE_RUNNING, pb.STAGE_DENOISE, step) for step in range(total + 1)]
    life += [(pb.JOB_STATE_RUNNING, pb.STAGE_DECODE, total), (pb.JOB_STATE_RUNNING, pb.STAGE_SAVE, total),
             (pb.JOB_STATE_SUCCEEDED, pb.STAGE_UNSPECIFIED, total)]
    values = [progress(state, stage, step, total) for state, stage, step in life]
    assert values == sorted(values) and values[0] == 0 and values[-1] == 100
    assert values[3] == 5 and values[3 + total] == 90 == values[4 + total]  # the last step and decode meet at 90
    assert all(0 <= v <= 100 for v in values)
    # a job that failed keeps what it had reached
    assert progress(pb.JOB_STATE_CANCELLED, pb.STAGE_DENOISE, 4, 8) == 5 + 85 * 4 // 8
    assert progress(pb.JOB_STATE_FAILED, pb.STAGE_DECODE, 8, 8) == 90


def test_last_stage_from_events():
    ev = pb.JobEvent
    events = [ev(queued=pb.Queued()), ev(stage_started=pb.StageStarted(stage=pb.STAGE_ENCODE)),
              ev(stage_started=pb.StageStarted(stage=pb.STAGE_DENOISE)), ev(step_completed=pb.StepCompleted(step=1))]
    assert last_stage(events) == pb.STAGE_DENOISE
    assert last_stage(events + [ev(restarted=pb.Restarted(attempt=2))]) == pb.STAGE_UNSPECIFIED
    assert last_stage([]) == pb.STAGE_UNSPECIFIED


def _job(state: int, **fields) -> pb.Job:
    params = pb.GenerationParams(model="wan", prompt="a fox", width=832, height=480, num_frames=81, fps=16, seed=2**63 + 1,
                                 num_inference_steps=10, output_format=pb.OUTPUT_FORMAT_MP4)
    return pb.Job(id="j1", state=state, params=params, total_steps=10, create_time=timestamp_pb2.Timestamp(seconds=1000), **fields)


def test_video_object_mapping():
    queued = video_object(_job(pb.JOB_STATE_QUEUED, queue_position=2), 0, 3600)
    assert {k: queued[k] for k in ("id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at",
                                   "seconds", "size", "error", "prompt")} == {
        "id": "j1", "object": "video", "model": "wan", "status": "queued", "progress": 0, "created_at": 1000, "completed_at": None,
        "expires_at": None, "seconds": "5.0625", "size": "832x480", "error": None, "prompt": "a fox"}
    assert queued["seed"] == str(2**63 + 1) and queued["queue_position"] == 2 and queued["state"] == "JOB_STATE_QUEUED"
    running = video_object(_job(pb.JOB_STATE_RUNNING, stage=pb.STAGE_DENOISE, step=5), 0, 3600)
    assert running["status"] == "in_progress" and running["progress"] == 5 + 85 * 5 // 10
    ended = timestamp_pb2.Timestamp(seconds=2000)
    done = video_object(_job(pb.JOB_STATE_SUCCEEDED, step=10, end_time=ended), pb.STAGE_SAVE, 3600.5)
    assert (done["status"], done["progress"], done["completed_at"], done["expires_at"]) == ("completed", 100, 2000, 2000 + 3601)
    assert video_object(_job(pb.JOB_STATE_SUCCEEDED, end_time=ended), 0, None)["expires_at"] is None  # --job-ttl 0: kept
    cancelled = video_object(_job(pb.JOB_STATE_CANCELLED, step=3, end_time=ended, error=errors.cancelled("stop")), pb.STAGE_DENOISE, 60)
    assert cancelled["status"] == "failed" and cancelled["error"] == {"code": "CANCELLED", "message": "stop"}
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and cancelled["progress"] == 5 + 85 * 3 // 10
    failed = video_object(_job(pb.JOB_STATE_FAILED, end_time=ended, error=errors.internal("boom", "WORKER_LOST")), pb.STAGE_ENCODE, 60)
    assert failed["error"] == {"code": "WORKER_LOST", "message": "boom"} and failed["progress"] == 1


def test_removing_a_finished_job_drops_it_and_its_artifact():
    dropped = []
    table = JobTable(on_drop=dropped.append)
    job = Job(params=pb.GenerationParams(num_inference_steps=1))
    table.add(job)
    with pytest.raises(ValueError):
        table.remove(job)  # not ended: cancel it first
    job.advance(Event.CANCEL, status=errors.cancelled())
    table.remove(job)
    assert table.get(job.id) is None and dropped == [job] and len(table) == 0
    table.remove(job)  # twice: nothing more
    assert dropped == [job]
