"""The engine driven by an instant scripted worker (no sockets): with the Result → next command fast
path, queued jobs still get placed as soon as room appears, Admit still precedes a job's first
stage, one command at a time per worker; and the dispatch trace (DIFFSERVE_DISPATCH_TRACE)."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from diffserve.scheduler.artifact_local import LocalArtifactStore
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.lifecycle import Phase
from diffserve.scheduler.steps import DispatchTrace
from diffserve.scheduler.wire import parse_message
from diffserve.v1 import generation_pb2 as pb
from diffserve.worker.simulated import sim_card
from diffserve.worker.v1 import worker_pb2 as wpb


class InstantLink:
    """Answers every compute command at once, as a worker with zero-time steps; records the order."""

    max_message_bytes = 1 << 24

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.log: list[tuple[str, str, str]] = []  # (worker, kind, request id)
        self.in_flight: dict[str, int] = {}
        self._next_id = 0

    def next_command_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def hello(self, worker_id: str) -> None:
        hello = wpb.Hello(protocol_version=wpb.PROTOCOL_VERSION_3, card=sim_card("sim"), max_batch_size=2, max_resident=2, world_size=1)
        self.inbox.put_nowait([worker_id.encode(), wpb.WorkerMessage(hello=hello).SerializeToString()])

    async def send(self, worker_id: str, command: wpb.Command) -> bool:
        kind = command.WhichOneof("body")
        if kind == "admit":
            self.log.append((worker_id, "admit", command.admit.request_id))
        if kind not in ("run_stage", "denoise_step"):
            return True
        assert worker_id not in self.in_flight, f"two commands in flight on {worker_id}"
        self.in_flight[worker_id] = command.id
        result = wpb.Result(command_id=command.id)
        frames = []
        if kind == "run_stage":
            for rid in command.run_stage.request_ids:
                self.log.append((worker_id, wpb.WorkerStage.Name(command.run_stage.stage), rid))
                entry = result.requests.add(request_id=rid)
                if command.run_stage.stage == wpb.WORKER_STAGE_DECODE:
                    entry.frames.CopyFrom(wpb.Tensor(dtype="uint8", shape=[1, 8, 8, 3], frame=len(frames)))
                    frames.append(np.zeros((1, 8, 8, 3), np.uint8).tobytes())
        else:
            for e in command.denoise_step.entries:
                self.log.append((worker_id, "step", e.request_id))
                result.requests.add(request_id=e.request_id)
        del self.in_flight[worker_id]
        self.inbox.put_nowait([worker_id.encode(), wpb.WorkerMessage(result=result).SerializeToString(), *frames])
        return True

    async def recv(self):
        return parse_message(await self.inbox.get(), self.max_message_bytes)


def test_queued_jobs_are_placed_as_room_appears_and_admitted_first(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DIFFSERVE_DISPATCH_TRACE", str(trace))
    monkeypatch.setattr(DispatchTrace, "FLUSH_S", 0.0)

    async def main():
        link = InstantLink()
        engine = Engine(EngineConfig(heartbeat_timeout_s=60), link, LocalArtifactStore(tmp_path / "out"))
        task = asyncio.get_running_loop().create_task(engine.run())
        try:
            link.hello("w1")
            link.hello("w2")
            while len(engine.list_models()[0].workers if engine.list_models() else []) < 2:
                await asyncio.sleep(0.005)
            params = pb.GenerationParams(prompt="x", height=8, width=8, num_frames=1, num_inference_steps=3, output_format=pb.OUTPUT_FORMAT_NPY)
            jobs = [engine.submit(params)[0] for _ in range(7)]  # 2 workers × 2 resident: 3 wait in the queue
            for _ in range(400):
                if all(j.done for j in jobs):
                    break
                await asyncio.sleep(0.01)
            return link, jobs
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    link, jobs = asyncio.run(asyncio.wait_for(main(), 20))
    assert [j.phase for j in jobs] == [Phase.SUCCEEDED] * 7
    for job in jobs:
        mine = [(w, kind) for w, kind, rid in link.log if rid == job.id]
        worker = mine[0][0]
        assert [k for _, k in mine] == ["admit", "WORKER_STAGE_ENCODE", "WORKER_STAGE_PREPARE", "step", "step", "step", "WORKER_STAGE_DECODE"]
        assert all(w == worker for w, _ in mine)
    assert {w for w, _, _ in link.log} == {"w1", "w2"}
    gaps = [g for line in trace.read_text().splitlines() for g in json.loads(line)["gaps_s"]]
    assert gaps and all(0 <= g < 5 for g in gaps)
