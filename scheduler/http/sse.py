"""A job's events as Server-Sent Events: the same JobEvents as StreamJobEvents, one SSE event each.

    id: 3
    event: step_completed
    data: {"job_id": "...", "sequence": "3", "time": "...", "step_completed": {"step": 2, "total_steps": 8, ...}}

`event` is the JobEvent's kind (queued, stage_started, step_completed, completed, failed, cancelled,
restarted); `data` its proto3 JSON form (field names as in the .proto). A reconnecting client
sends Last-Event-ID and gets only the events after it. A comment line every KEEPALIVE_S keeps
proxies from closing a quiet stream; the stream ends after the job's last event.
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from diffserve.v1 import generation_pb2 as pb

from diffserve.scheduler.jobs import Job

KEEPALIVE_S = 15.0
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_dict(event: pb.JobEvent) -> dict:
    return json_format.MessageToDict(event, preserving_proto_field_name=True)


def frame(event: pb.JobEvent) -> bytes:
    data = json.dumps(event_dict(event), separators=(",", ":"))
    return f"id: {event.sequence}\nevent: {event.WhichOneof('event')}\ndata: {data}\n\n".encode()


def last_event_id(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


async def stream(job: Job, after: int = 0):
    """The SSE bytes of `job`'s events with sequence > after, until the job ends."""
    seen = 0
    while True:
        while seen < len(job.events):
            event = job.events[seen]
            seen += 1
            if event.sequence > after:
                yield frame(event)
        if job.done:
            return
        before = len(job.events)
        await job.wait_change(seen, timeout=KEEPALIVE_S)
        if len(job.events) == before and not job.done:
            yield b": keep-alive\n\n"
