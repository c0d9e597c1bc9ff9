"""Stages beside the steps (`--concurrent-stages`): a finishing job's decode no longer stalls the
steps of the jobs still denoising, and every job still equals its solo run.

The proof is in the scheduler's events: the long job's steps whose Results arrived while the other
job's DECODE command was running (between its stage_started(DECODE) and its completion). The scheduler
stamps stage_started when it sends the command; steps are pipelined, so up to `QUEUED` step commands
of the long job may already be in the worker's queue then and complete after that stamp even with
serial stages. With serial stages no more than those complete; with concurrent stages many more do
(tens on a 2-core machine: the long job's 32x32 steps are far shorter than the video's decode)."""

from __future__ import annotations

import pytest

from diffserve.v1 import generation_pb2 as pb

from jobs_util import npy_output, wait_step
from reference import max_level_diff

# Step commands the scheduler may have sent before the decode: the one running and the next one
# (pipelined dispatch, docs/architecture.md).
QUEUED = 2

LONG = dict(prompt="a cat in the snow", height=32, width=32, num_frames=1, num_inference_steps=400, seed=5,
            output_format="npy")
VIDEO = dict(prompt="a dog on the beach", height=96, width=128, num_frames=17, num_inference_steps=2, seed=6,
             output_format="npy")


def _time(event) -> float:
    return event.time.seconds + event.time.nanos / 1e9


def steps_during_decode(client, long_id: str, video_id: str) -> int:
    video = list(client.events(video_id))
    (decode,) = [e for e in video if e.WhichOneof("event") == "stage_started" and e.stage_started.stage == pb.STAGE_DECODE]
    (done,) = [e for e in video if e.WhichOneof("event") == "completed"]
    start, end = _time(decode), _time(done)
    events = list(client.events(long_id))
    (long_done,) = [e for e in events if e.WhichOneof("event") == "completed"]
    assert _time(long_done) > end, "the long job ended before the video's decode did: nothing to compare"
    return sum(start < _time(e) < end for e in events if e.WhichOneof("event") == "step_completed")


@pytest.mark.parametrize("concurrent", [False, True], ids=["serial", "concurrent"])
def test_decode_runs_beside_the_steps_and_outputs_equal_solo(tiny_wan, start_server, concurrent):
    flags = ("--concurrent-stages",) if concurrent else ()
    server = start_server(tiny_wan, "--max-batch-size", "4", *flags)
    client = server.client
    solo_long = npy_output(client, client.submit(**LONG).id)
    solo_video = npy_output(client, client.submit(**VIDEO).id)

    long = client.submit(**LONG)
    wait_step(client, long.id, 2)
    video = client.submit(**VIDEO)
    assert max_level_diff(npy_output(client, video.id), solo_video) == 0
    assert max_level_diff(npy_output(client, long.id), solo_long) == 0

    overlapped = steps_during_decode(client, long.id, video.id)
    if concurrent:
        assert overlapped > QUEUED, f"only {overlapped} steps of the long job completed while the video decoded"
    else:
        assert overlapped <= QUEUED, f"{overlapped} steps completed during a decode with serial stages"
