"""The engine against a scripted worker: commands it sends, finished ids on the next command (or
a Free when the worker is idle), cancels at the step boundary, Reregister, worker loss, drain.

No sockets and no torch: a fake link stands in for the ROUTER socket and the test answers the
commands itself.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from diffserve.scheduler.artifacts import ArtifactStore
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.errors import RequestError, cancelled
from diffserve.scheduler.lifecycle import Phase
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
        return await self.inbox.get()

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
    def __init__(self, tmp_path, max_batch_size: int = 1):
        self.link = FakeLink()
        self.engine = Engine(EngineConfig(heartbeat_timeout_s=60), self.link, ArtifactStore(tmp_path))
        self.max_batch_size = max_batch_size

    async def __aenter__(self):
        self.task = asyncio.get_running_loop().create_task(self.engine.run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def register(self, worker_id: str = "w1") -> None:
        hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_2, card=MODEL, max_batch_size=self.max_batch_size, max_resident=4, world_size=1)
        await self.link.inbox.put((worker_id, wpb.WorkerMessage(hello=hello), []))
        await until(lambda: "welcome" in self.link.kinds(), "the Welcome")

    async def next_compute(self, n: int) -> wpb.Command:
        """Waits for the engine's n-th compute command (1-based)."""
        await until(lambda: len(self.link.compute()) >= n, f"compute command {n}")
        return self.link.compute()[n - 1]

    async def answer(self, command: wpb.Command, worker_id: str = "w1") -> None:
        result = wpb.Result(command_id=command.id, elapsed_ms=1.0)
        frames = []
        if command.HasField("run_stage"):
            entry = result.requests.add(request_id=command.run_stage.request_id)
            if command.run_stage.stage == wpb.WORKER_STAGE_DECODE:
                video = np.zeros((1, 32, 32, 3), dtype=np.uint8)
                entry.frames.CopyFrom(wpb.Tensor(dtype="uint8", shape=video.shape, frame=0))
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
            assert second.run_stage.request_id == a.id and b.phase is Phase.ENCODE and not b.in_flight
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
        async with Harness(tmp_path) as h:
            serving = []
            h.engine.watch_serving(serving.append)
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            encode = await h.next_compute(1)
            h.engine.worker_lost("w1", "test")
            assert job.phase is Phase.FAILED and "was lost: test" in job.error.message
            assert serving == [{"m": True}, {"m": False}] and not h.engine.any_worker_alive()
            await h.answer(encode)  # arrives after the loss
            await asyncio.sleep(0.05)
            assert job.phase is Phase.FAILED
            (model,) = h.engine.list_models()
            assert model.state == pb.SERVING_STATE_NOT_SERVING

    run(main())


def test_stop_accepting_and_drain(tmp_path):
    async def main():
        async with Harness(tmp_path) as h:
            await h.register()
            job, _ = h.engine.submit(PARAMS)
            h.engine.stop_accepting()
            assert not h.engine.accepting
            with pytest.raises(RequestError) as info:
                h.engine.submit(PARAMS)
            assert "shutting down" in info.value.status.message
            encode = await h.next_compute(1)
            assert h.engine.busy()
            await h.engine.drain(0.05, cancelled("the server shut down"))
            assert job.cancel_status.message == "the server shut down" and not job.done  # in a command
            await h.answer(encode)
            await until(lambda: job.done, "the cancel at the step boundary")
            assert job.phase is Phase.CANCELLED and not h.engine.busy()

    run(main())
