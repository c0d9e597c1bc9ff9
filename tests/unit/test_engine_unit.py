"""The engine against a scripted worker: commands it sends, finished ids on the next command (or
a Free when the worker is idle), cancels at the step boundary, Reregister, worker loss, drain;
and against peers that misbehave: forged Results, malformed messages of every kind (each
disconnects only its sender), a card that tries to raise the limits.

No sockets and no torch: a fake link stands in for the ROUTER socket and the test answers the
commands itself. Raw frames put on its inbox go through the real parser (wire.parse_message).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from diffserve.scheduler.artifact_local import LocalArtifactStore
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.errors import RequestError, cancelled
from diffserve.scheduler.lifecycle import Phase
from diffserve.scheduler.wire import ProtocolError, parse_message
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.v1 import worker_pb2 as wpb

MODEL = wpb.ModelCard(
    name="m",
    defaults=wpb.ModelDefaults(height=32, width=32, num_frames=1, num_inference_steps=2, guidance_scale=5.0, fps=16),
    limits=wpb.ModelLimits(size_multiple=16, max_height=256, max_width=256, max_pixels=256 * 256, frame_step=4,
                           max_num_frames=9, max_num_inference_steps=1000, prompt_required=True, max_images=0),
    guidance_kind=wpb.GUIDANCE_KIND_CFG,
    num_experts=1,
)
PARAMS = pb.GenerationParams(prompt="x", num_inference_steps=2, output_format=pb.OUTPUT_FORMAT_NPY)


class FakeLink:
    """Records what the engine sends; the test puts the worker's messages on `inbox`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, wpb.Command]] = []
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._next_id = 0

    def next_command_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, worker_id: str, command: wpb.Command) -> bool:
        self.sent.append((worker_id, command))
        return True

    async def recv(self):
        item = await self.inbox.get()
        if isinstance(item, list):  # raw ZeroMQ frames, as the ROUTER would give them
            return parse_message(item, self.max_message_bytes)
        return item

    max_message_bytes = 1 << 20

    def kinds(self) -> list[str]:
        return [c.WhichOneof("body") for _, c in self.sent]

    def compute(self) -> list[wpb.Command]:
        return [c for _, c in self.sent if c.WhichOneof("body") in ("run_stage", "denoise_step")]


async def until(predicate, what: str, timeout_s: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Harness:
    def __init__(self, tmp_path, max_batch_size: int = 1, max_attempts: int = 2):
        self.link = FakeLink()
        self.engine = Engine(EngineConfig(heartbeat_timeout_s=60, max_attempts=max_attempts), self.link, LocalArtifactStore(tmp_path))
        self.max_batch_size = max_batch_size

    async def __aenter__(self):
        self.task = asyncio.get_running_loop().create_task(self.engine.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def register(self, worker_id: str = "w1", card: wpb.ModelCard = MODEL, concurrent_stages: bool = False) -> None:
        hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=card, max_batch_size=self.max_batch_size, max_resident=4, world_size=1,
                          concurrent_stages=concurrent_stages)
        await self.link.inbox.put((worker_id, wpb.WorkerMessage(hello=hello), []))
        await until(lambda: (worker_id, "welcome") in [(w, c.WhichOneof("body")) for w, c in self.link.sent], f"the Welcome of {worker_id}")

    async def next_compute(self, n: int) -> wpb.Command:
        """Waits for the engine's n-th compute command (1-based)."""
        await until(lambda: len(self.link.compute()) >= n, f"compute command {n}")
        return self.link.compute()[n - 1]

    async def answer(self, command: wpb.Command, worker_id: str = "w1") -> None:
        result = wpb.Result(command_id=command.id, elapsed_ms=1.0)
        frames = []
        if command.HasField("run_stage"):
            for rid in command.run_stage.request_ids:
                entry = result.requests.add(request_id=rid)
                if command.run_stage.stage == wpb.WORKER_STAGE_DECODE:
                    video = np.zeros((1, 32, 32, 3), dtype=np.uint8)
                    entry.frames.CopyFrom(wpb.Tensor(dtype="uint8", shape=video.shape, frame=len(frames)))
                    frames.append(video.tobytes())
        else:
            result.requests.extend(wpb.RequestResult(request_id=e.request_id) for e in command.denoise_step.entries)
        await self.link.inbox.put((worker_id, wpb.WorkerMessage(result=result), frames))

    async def run_through(self, first: int, count: int) -> None:
        for n in range(first, first + count):
            await self.answer(await self.next_compute(n))


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 20))


def test_a_job_runs_and_is_freed_when_its_worker_goes_idle(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            job, created = h.engine.submit(PARAMS)
            assert created and h.engine.get_job(job.id) is job and h.engine.list_jobs() == [job]
            await h.run_through(1, 5)  # ENCODE, PREPARE, 2 steps, DECODE
            await until(lambda: job.done, "the job to finish")
            assert job.phase is Phase.SUCCEEDED and job.artifact.media_type == "application/x-npy"
            stages = [c.run_stage.stage if c.HasField("run_stage") else "step" for c in h.link.compute()]
            assert stages == [wpb.WORKER_STAGE_ENCODE, wpb.WORKER_STAGE_PREPARE, "step", "step", wpb.WORKER_STAGE_DECODE]
            # Nothing else to run after DECODE: the free goes out as its own Free.
            await until(lambda: h.link.kinds()[-1] == "free", "the Free")
            assert list(h.link.sent[-1][1].free.request_ids) == [job.id]
            assert h.link.kinds()[:3] == ["welcome", "admit", "run_stage"]
            assert not any(c.finished_ids for c in h.link.compute())
            assert h.engine.job_proto(job).state == pb.JOB_STATE_SUCCEEDED
            assert not h.engine.busy()

    run(main())


def test_finished_ids_ride_on_the_next_command(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            a, _ = h.engine.submit(PARAMS)
            b, _ = h.engine.submit(PARAMS)
            await h.answer(await h.next_compute(1))  # ENCODE a
            second = await h.next_compute(2)  # PREPARE a (older first); b waits for ENCODE
            assert list(second.run_stage.request_ids) == [a.id] and b.phase is Phase.ENCODE and not b.in_flight
            h.engine.cancel(b, cancelled())
            assert b.phase is Phase.CANCELLED  # between commands: at once, freed with the next command
            await h.answer(second)
            third = await h.next_compute(3)
            assert list(third.finished_ids) == [b.id] and [e.request_id for e in third.denoise_step.entries] == [a.id]
            assert "free" not in h.link.kinds()

    run(main())


def test_cancel_in_flight_waits_for_the_step_boundary(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            await h.run_through(1, 2)
            step = await h.next_compute(3)
            assert step.HasField("denoise_step")
            h.engine.cancel(job, cancelled("mid-step"))
            assert job.state == pb.JOB_STATE_RUNNING and job.cancel_status is not None
            h.engine.cancel(job, cancelled("again"))  # harmless
            await h.answer(step)
            await until(lambda: job.done, "the cancel")
            assert job.phase is Phase.CANCELLED and job.error.message == "mid-step" and job.step == 0
            await until(lambda: h.link.kinds()[-1] == "free", "the Free")
            assert list(h.link.sent[-1][1].free.request_ids) == [job.id]
            assert [e.WhichOneof("event") for e in job.events][-1] == "cancelled"

    run(main())


def test_queued_job_cancel_and_positions(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            jobs = [h.engine.submit(PARAMS)[0] for _ in range(6)]  # max_resident 4: two stay queued
            await until(lambda: h.link.kinds().count("admit") == 4, "four admits")
            q1, q2 = jobs[4], jobs[5]
            assert (h.engine.queue_position(q1), h.engine.queue_position(q2)) == (1, 2)
            h.engine.cancel(q1, cancelled())
            assert q1.phase is Phase.CANCELLED and h.engine.queue_position(q2) == 1
            assert q2.events[-1].queued.position == 1

    run(main())


def test_unknown_worker_is_asked_to_reregister(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.link.inbox.put(("ghost", wpb.WorkerMessage(heartbeat=wpb.Heartbeat(sequence=1)), []))
            await until(lambda: h.link.sent, "an answer")
            worker_id, command = h.link.sent[0]
            assert worker_id == "ghost" and command.HasField("reregister")

    run(main())


def test_lost_worker_fails_its_jobs_and_late_results_are_ignored(tmp_path):
    async def main():
        async with Harness(tmp_path, max_attempts=1) as h:
            serving = []
            h.engine.watch_serving(serving.append)
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            encode = await h.next_compute(1)
            h.engine.worker_lost("w1", "test")
            assert job.phase is Phase.FAILED and "was lost: test (attempt 1 of 1)" in job.error.message
            assert serving == [{"m": True}, {"m": False}] and not h.engine.any_worker_alive()
            await h.answer(encode)  # arrives after the loss
            await asyncio.sleep(0.05)
            assert job.phase is Phase.FAILED
            (model,) = h.engine.list_models()
            assert model.state == pb.SERVING_STATE_NOT_SERVING

    run(main())


def test_a_lost_workers_jobs_go_back_to_the_queue_and_finish_elsewhere(tmp_path):
    """Attempt 1 dies mid-denoise on w1: the job is QUEUED again (attempt 2, a `restarted` event
    with the reason), a late Result from w1 changes nothing, it runs from step 0 on w2 and
    succeeds. Lost again on its last attempt, a job fails naming the attempts."""
    async def main():
        async with Harness(tmp_path) as h:
            await h.register("w1")
            job, _ = h.engine.submit(PARAMS)
            await h.run_through(1, 3)  # encode, prepare, step 1
            late = await h.next_compute(4)  # step 2, in flight
            assert job.step == 1
            h.engine.worker_lost("w1", "test")
            assert job.phase is Phase.QUEUED and job.attempt == 2 and job.step == 0 and job.worker_id is None
            restarted, queued = job.events[-2:]
            assert queued.queued.position == 1
            assert restarted.restarted.attempt == 2 and "was lost: test" in restarted.restarted.reason
            assert h.engine.job_proto(job).attempt == 2
            await h.answer(late, "w1")
            await h.register("w2")
            await _drive(h, "w2", job)
            assert job.phase is Phase.SUCCEEDED and job.attempt == 2
            steps = [e.step_completed.step for e in job.events if e.WhichOneof("event") == "step_completed"]
            assert steps == [1, 1, 2]  # one step on w1, then both again on w2

            again, _ = h.engine.submit(PARAMS)
            await until(lambda: again.phase is Phase.ENCODE, "admitted to w2")
            h.engine.worker_lost("w2", "first")
            assert again.phase is Phase.QUEUED
            await h.register("w3")
            await until(lambda: again.worker_id == "w3", "admitted to w3")
            h.engine.worker_lost("w3", "second")
            assert again.phase is Phase.FAILED and "(attempt 2 of 2)" in again.error.message

    run(main())


def test_stop_accepting_and_drain(tmp_path):
    """Draining refuses submits and says NOT_SERVING; a running job gets the drain time, is left as
    it is after it (nothing is cancelled) and still runs to the end while the server lives."""
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            encode = await h.next_compute(1)
            h.engine.stop_accepting()
            assert not h.engine.accepting
            with pytest.raises(RequestError) as info:
                h.engine.submit(PARAMS)
            assert "shutting down" in info.value.status.message
            assert [m.state for m in h.engine.list_models()] == [pb.SERVING_STATE_NOT_SERVING]
            assert h.engine.busy()
            assert await h.engine.drain(0.05) == (1, 0)  # (running, queued) left
            assert job.cancel_status is None and job.phase is Phase.ENCODE  # in a command, not cancelled
            await h.answer(encode)
            await _drive(h, "w1", job)
            assert job.phase is Phase.SUCCEEDED and not h.engine.busy()
            assert await h.engine.drain(1.0) == (0, 0)

    run(main())


def test_drain_leaves_queued_jobs_queued(tmp_path):
    """Queued jobs are neither started nor cancelled while draining: they stay for the next start."""
    async def main():
        async with Harness(tmp_path) as h:
            await h.register("w1")
            h.engine.worker_lost("w1", "gone")  # the model stays known; no worker serves it
            job, _ = h.engine.submit(PARAMS)
            h.engine.stop_accepting()
            await h.register("w2")
            assert await h.engine.drain(0.3) == (0, 1)
            assert job.phase is Phase.QUEUED and job.cancel_status is None
            assert not [c for w, c in h.link.sent if w == "w2" and c.WhichOneof("body") == "admit"]

    run(main())


# ---- peers that misbehave ----

def _sent_to(h: Harness, worker_id: str, kind: str) -> list[wpb.Command]:
    return [c for w, c in h.link.sent if w == worker_id and c.WhichOneof("body") == kind]


async def _drive(h: Harness, worker_id: str, job, stop_at_decode: bool = False) -> wpb.Command | None:
    """Answers `worker_id`'s compute commands until `job` ends (or, with stop_at_decode, returns
    its DECODE command unanswered)."""
    answered: set[int] = set()
    deadline = asyncio.get_running_loop().time() + 5
    while not job.done:
        assert asyncio.get_running_loop().time() < deadline, f"job stuck in {job.phase}"
        pending = [c for w, c in h.link.sent if w == worker_id and c.WhichOneof("body") in ("run_stage", "denoise_step") and c.id not in answered]
        if not pending:
            await asyncio.sleep(0.005)
            continue
        command = pending[0]
        if stop_at_decode and command.HasField("run_stage") and command.run_stage.stage == wpb.WORKER_STAGE_DECODE:
            return command
        answered.add(command.id)
        await h.answer(command, worker_id)
    return None


async def _two_workers_two_jobs(h: Harness):
    """w1 and w2 registered, one job admitted to each: (job on w1, job on w2)."""
    await h.register("w1")
    await h.register("w2")
    a, _ = h.engine.submit(PARAMS)
    b, _ = h.engine.submit(PARAMS)
    await until(lambda: len([c for _, c in h.link.sent if c.HasField("admit")]) == 2, "two admits")
    assert {a.worker_id, b.worker_id} == {"w1", "w2"}
    return (a, b) if a.worker_id == "w1" else (b, a)


async def _engine_processed(h: Harness, probe: str = "probe") -> None:
    """Waits until the engine has handled everything queued before this call (a heartbeat from an
    unknown id is answered with Reregister, in order)."""
    before = len(_sent_to(h, probe, "reregister"))
    await h.link.inbox.put((probe, wpb.WorkerMessage(heartbeat=wpb.Heartbeat(sequence=1)), []))
    await until(lambda: len(_sent_to(h, probe, "reregister")) > before, "the engine to catch up")


def test_results_count_only_from_the_worker_the_command_was_sent_to(tmp_path):
    """Forged Results (an unregistered peer guessing command ids, and a registered worker answering
    another's command) are dropped without taking the command away; the real Result completes the job."""
    async def main():
        async with Harness(tmp_path) as h:
            on_w1, on_w2 = await _two_workers_two_jobs(h)
            (encode,) = _sent_to(h, "w1", "run_stage")
            failed = wpb.RequestResult(request_id=on_w1.id, status={"code": 13, "message": "forged"})
            (own,) = _sent_to(h, "w2", "run_stage")  # w2's answer to its own command would be genuine
            for command_id in range(1, 50):
                for forger in ("ghost", "w2", "\x1b[2Jevil" * 20):
                    if forger == "w2" and command_id == own.id:
                        continue
                    forged = wpb.Result(command_id=command_id, requests=[failed])
                    await h.link.inbox.put((forger, wpb.WorkerMessage(result=forged), []))
            await _engine_processed(h)
            assert on_w1.phase is Phase.ENCODE and on_w1.in_flight and not on_w1.done
            assert h.engine._registry.get("w1").in_flight == encode.id
            assert {w.id for (m,) in [h.engine.list_models()] for w in m.workers} == {"w1", "w2"}  # a stray Result is no crime
            await _drive(h, "w1", on_w1)
            await _drive(h, "w2", on_w2)
            assert on_w1.phase is Phase.SUCCEEDED and on_w2.phase is Phase.SUCCEEDED

    run(main())


def _tensor_result(request_id: str, command_id: int, tensor: wpb.Tensor | None) -> bytes:
    outcome = wpb.RequestResult(request_id=request_id)
    if tensor is not None:
        outcome.frames.CopyFrom(tensor)
    return wpb.WorkerMessage(result=wpb.Result(command_id=command_id, requests=[outcome])).SerializeToString()


GOOD_FRAMES = np.zeros((1, 32, 32, 3), dtype=np.uint8).tobytes()
HELLO_BYTES = wpb.WorkerMessage(hello=wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=MODEL, max_resident=4)).SerializeToString()

# Raw messages from w2, each breaking the protocol. Those marked `decode` answer w2's DECODE
# command (so only the plan shows they are wrong); the others are wrong on their own.
MALFORMED = {
    "bad protobuf": (False, lambda rid, cid: [b"\x0a\xff\xff\xff\xff"]),
    "no body": (False, lambda rid, cid: [b""]),
    "no message frame": (False, lambda rid, cid: []),
    "shape does not match bytes": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[1, 32, 32, 3])), b"x" * 10]),
    "shape overflows": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[2**62, 2**62, -1])), b"x"]),
    "frame index out of range": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[3], frame=5)), b"xyz"]),
    "negative frame index": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[3], frame=-1)), b"xyz"]),
    "unknown dtype": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="O", shape=[1])), b"\0" * 8]),
    "missing frames": (False, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[1, 32, 32, 3]))]),
    "too many frames": (False, lambda rid, cid: [HELLO_BYTES] + [b""] * 100),
    "over the size cap": (False, lambda rid, cid: [HELLO_BYTES, b"\0" * (600 << 10), b"\0" * (600 << 10)]),
    "decode without frames": (True, lambda rid, cid: [_tensor_result(rid, cid, None)]),
    "decode of the wrong shape": (True, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="uint8", shape=[1, 16, 16, 3])), b"\0" * 768]),
    "decode of the wrong dtype": (True, lambda rid, cid: [_tensor_result(rid, cid, wpb.Tensor(dtype="float32", shape=[1, 32, 32, 3])), b"\0" * 12288]),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_message_disconnects_only_its_sender(tmp_path, kind):
    """w2 breaks the protocol: it is dropped and its job fails (UNAVAILABLE, WORKER_LOST); the
    receive loop goes on, w1's job completes and a new job still runs."""
    at_decode, frames = MALFORMED[kind]

    async def main():
        async with Harness(tmp_path, max_attempts=1) as h:  # its job fails at once (no second run)
            on_w1, on_w2 = await _two_workers_two_jobs(h)
            command_id = 0
            if at_decode:
                command_id = (await _drive(h, "w2", on_w2, stop_at_decode=True)).id
            await h.link.inbox.put([b"w2", *frames(on_w2.id, command_id)])
            await until(lambda: on_w2.done, "w2's job to fail")
            assert on_w2.phase is Phase.FAILED and on_w2.error.code == 14  # UNAVAILABLE: retry elsewhere
            assert "malformed message" in on_w2.error.message
            (model,) = h.engine.list_models()
            assert [w.id for w in model.workers] == ["w1"] and model.state == pb.SERVING_STATE_SERVING
            await _drive(h, "w1", on_w1)
            assert on_w1.phase is Phase.SUCCEEDED
            again, _ = h.engine.submit(PARAMS)
            await _drive(h, "w1", again)
            assert again.phase is Phase.SUCCEEDED

    run(main())


def test_malformed_messages_from_unregistered_peers_are_dropped(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register("w1")
            job, _ = h.engine.submit(PARAMS)
            for _, frames in MALFORMED.values():
                await h.link.inbox.put([b"ghost", *frames(job.id, 1)])
            await h.link.inbox.put([b"\xff\xfe-not-utf8", HELLO_BYTES])  # would alias another id if decoded with "replace"
            await h.link.inbox.put([])
            await _engine_processed(h)
            (model,) = h.engine.list_models()
            assert [w.id for w in model.workers] == ["w1"]
            await _drive(h, "w1", job)
            assert job.phase is Phase.SUCCEEDED

    run(main())


def test_a_card_cannot_raise_the_limits_of_the_first(tmp_path):
    """The first card for a model name is the contract: a Hello with raised limits is refused (also
    under the registered worker's own id, which keeps its job); requests are still checked
    against the first card."""
    raised = wpb.ModelCard()
    raised.CopyFrom(MODEL)
    raised.limits.max_num_inference_steps = 10**9
    raised.limits.max_height = 1 << 20

    async def main():
        async with Harness(tmp_path) as h:
            await h.register("w1")
            job, _ = h.engine.submit(PARAMS)
            await h.next_compute(1)
            for worker_id in ("w2", "w1"):
                hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=raised, max_resident=4, world_size=1)
                await h.link.inbox.put((worker_id, wpb.WorkerMessage(hello=hello), []))
            await _engine_processed(h)
            assert not _sent_to(h, "w2", "welcome") and len(_sent_to(h, "w1", "welcome")) == 1
            (model,) = h.engine.list_models()
            assert [w.id for w in model.workers] == ["w1"] and model.limits.max_num_inference_steps == 1000
            with pytest.raises(RequestError) as info:
                h.engine.submit(pb.GenerationParams(prompt="x", num_inference_steps=5000, output_format=pb.OUTPUT_FORMAT_NPY))
            assert info.value.status.code == 3 and "num_inference_steps" in str(info.value.status)
            await _drive(h, "w1", job)
            assert job.phase is Phase.SUCCEEDED
            await h.register("w3", MODEL)  # the same card registers

    run(main())


def test_a_card_whose_output_exceeds_the_message_cap_is_refused(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            h.engine.config.max_worker_message_bytes = 9 * 256 * 256 * 3 - 1  # MODEL: 9 frames of at most 256x256
            hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=MODEL, max_resident=4, world_size=1)
            await h.link.inbox.put(("w1", wpb.WorkerMessage(hello=hello), []))
            await _engine_processed(h)
            assert not _sent_to(h, "w1", "welcome") and h.engine.list_models() == []
            h.engine.config.max_worker_message_bytes += 1
            await h.register("w1")

    run(main())


def test_parse_message_checks_tensors_and_sizes():
    ok = [b"w", _tensor_result("r", 1, wpb.Tensor(dtype="uint8", shape=[1, 32, 32, 3])), GOOD_FRAMES]
    worker_id, msg, frames = parse_message(ok, max_bytes=1 << 20)
    assert worker_id == "w" and msg.result.command_id == 1 and len(frames) == 1
    with pytest.raises(ProtocolError) as info:
        parse_message(ok, max_bytes=len(GOOD_FRAMES))
    assert info.value.worker_id == "w" and "at most" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        parse_message([b"\xff" * 300, HELLO_BYTES])
    assert info.value.worker_id is None and len(str(info.value)) < 120  # escaped and truncated


def test_peer_triggered_log_lines_are_throttled(caplog):
    import logging

    from diffserve.scheduler.wire import Throttled

    throttled = Throttled(logging.getLogger("throttle-test"), interval_s=60)
    with caplog.at_level(logging.WARNING, logger="throttle-test"):
        for n in range(1000):
            throttled.warning("forged", "forged %d", n)
        throttled.warning("other", "another kind")
        throttled._last["forged"] -= 120  # a minute later
        throttled.warning("forged", "forged again")
    assert [r.getMessage() for r in caplog.records] == ["forged 0", "another kind", "forged again (and 999 more like it since the last such line)"]


def test_the_serve_flag_default_is_the_wire_cap():
    import argparse

    from diffserve.scheduler.app import add_serve_flags
    from diffserve.scheduler.wire import DEFAULT_MAX_MESSAGE_BYTES

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    assert parser.parse_args([]).max_worker_message_bytes == DEFAULT_MAX_MESSAGE_BYTES


@pytest.mark.parametrize("goodbye", [True, False], ids=["goodbye-behind-the-result", "silence"])
def test_a_failed_send_waits_for_a_goodbye_before_declaring_the_worker_lost(tmp_path, goodbye):
    """A worker that leaves sends its last Result, then Goodbye, and closes its socket: the send of
    its next command fails before the Goodbye is read. The loss is declared a moment later, so the
    Goodbye's reason is the one on record; without a Goodbye it is "its socket is gone"."""
    async def main():
        async with Harness(tmp_path) as h:
            await h.register("w1")
            job, _ = h.engine.submit(PARAMS)
            encode = await h.next_compute(1)

            async def refuse(worker_id, command):
                h.link.sent.append((worker_id, command))
                return False

            h.link.send = refuse  # its socket is closed: the next command cannot go out
            await h.answer(encode)
            await until(lambda: h.engine._registry.get("w1").lost_soon, "the failed send")
            assert h.engine._registry.get("w1") is not None and job.attempt == 1  # not declared lost yet
            if goodbye:
                await h.link.inbox.put(("w1", wpb.WorkerMessage(goodbye=wpb.Goodbye(reason="SIGTERM on host pid 1")), []))
            await until(lambda: h.engine._registry.get("w1") is None, "the loss", 2)
            restarted = next(e.restarted for e in job.events if e.WhichOneof("event") == "restarted")
            expected = "shutting down ('SIGTERM on host pid 1')" if goodbye else "its socket is gone"
            assert expected in restarted.reason, restarted.reason

    run(main())


def test_a_worker_with_concurrent_stages_gets_a_stage_beside_a_step(tmp_path):
    """Two lanes: while job a's step is in flight, job b's ENCODE goes out too; a one-lane worker
    (every other test here) never has two compute commands in flight."""

    async def main():
        async with Harness(tmp_path, max_batch_size=4) as h:
            await h.register(concurrent_stages=True)
            a, _ = h.engine.submit(PARAMS)
            await h.answer(await h.next_compute(1))  # a: ENCODE
            await h.answer(await h.next_compute(2))  # a: PREPARE
            step = await h.next_compute(3)
            assert step.HasField("denoise_step")
            b, _ = h.engine.submit(PARAMS)
            encode = await h.next_compute(4)  # sent while a's step is still in flight
            assert list(encode.run_stage.request_ids) == [b.id] and encode.run_stage.stage == wpb.WORKER_STAGE_ENCODE
            worker = h.engine._registry.get("w1")
            assert a.in_flight and b.in_flight
            assert worker.in_flight == step.id and worker.stage_in_flight == encode.id and not worker.idle
            await h.answer(encode)  # the stage lane frees first; the step lane is still busy
            prepare = await h.next_compute(5)
            assert list(prepare.run_stage.request_ids) == [b.id] and prepare.run_stage.stage == wpb.WORKER_STAGE_PREPARE
            assert worker.in_flight == step.id
            answered = {1, 2, encode.id}  # the step and the prepare are still in flight
            deadline = asyncio.get_running_loop().time() + 10
            while not (a.done and b.done):  # answer whatever is in flight until both end
                assert asyncio.get_running_loop().time() < deadline, f"the jobs did not finish: {a.phase} {b.phase} {[(c.id, c.WhichOneof('body')) for c in h.link.compute()]} {answered}"
                for command in [step, prepare, *h.link.compute()]:
                    if command.id not in answered:
                        answered.add(command.id)
                        await h.answer(command)
                await asyncio.sleep(0.005)
            assert a.state == pb.JOB_STATE_SUCCEEDED and b.state == pb.JOB_STATE_SUCCEEDED

    run(main())
