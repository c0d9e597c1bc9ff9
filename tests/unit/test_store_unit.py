"""The durable job store (scheduler/store.py) on a real SQLite file in tmp_path: every field of a
job round-trips; writes happen on phase changes, not on denoising steps; an older schema is
upgraded, a newer one refused; a damaged, empty, foreign or locked file is refused naming the file;
retention drops jobs with their rows and artifacts; the engine's restore puts every job where it
belongs; queue position events are sent per band, not per move.

No sockets, no torch: the engine runs no loop here (restore needs none).
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from diffserve.scheduler import errors
from diffserve.scheduler.admission import Admission, position_band
from diffserve.scheduler.artifact_local import LocalArtifactStore
from diffserve.scheduler.engine import Engine, EngineConfig
from diffserve.scheduler.jobs import Job, JobTable
from diffserve.scheduler.lifecycle import Event, Phase
from diffserve.scheduler.registry import WorkerRegistry
from diffserve.scheduler.store import MIGRATIONS, SCHEMA_VERSION, JobStore, StoreError, decode_events, encode_events
from diffserve.v1 import generation_pb2 as pb

PARAMS = pb.GenerationParams(prompt="a cat", negative_prompt="blur", height=32, width=32, num_frames=1, num_inference_steps=3, seed=7,
                             guidance_scale=5.0, output_format=pb.OUTPUT_FORMAT_NPY, images=[pb.ImageInput(data=b"\x89PNG" + bytes(range(256)))])


def store_at(tmp_path, **kwargs) -> JobStore:
    return JobStore.open(tmp_path / "state" / "jobs.sqlite3", **kwargs)


def run_to(job: Job, phase: Phase, steps: int = 0) -> Job:
    """Moves a QUEUED job through its real transitions to `phase` (`steps` denoising steps done)."""
    job.advance(Event.ADMIT, worker_id="w1")
    for stage in (Phase.ENCODE, Phase.PREPARE):
        if job.phase is phase:
            return job
        job.advance(Event.DISPATCH)
        job.advance(Event.DONE)
    for _ in range(steps if phase is Phase.DENOISE else job.total_steps):
        job.advance(Event.DISPATCH)
        job.advance(Event.STEP, step_ms=1.0, batch_jobs=1)
    if job.phase is phase:
        return job
    job.advance(Event.DISPATCH)
    job.advance(Event.DONE)  # decoded: SAVE
    if phase is Phase.SUCCEEDED:
        job.advance(Event.DONE, artifact=pb.Artifact(id=job.id, file_name=f"{job.id}.npy", media_type="application/x-npy", size_bytes=10))
    return job


def fields(job: Job) -> dict:
    return {name: getattr(job, name) for name in ("id", "principal", "client_request_id", "priority", "phase", "step", "attempt", "params",
                                                   "created", "started", "ended", "artifact", "error", "cancel_status", "events")}


def test_every_field_round_trips(tmp_path):
    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    done = Job(params=PARAMS, client_request_id="key-1", principal="alice", priority=3)
    table.add(done)
    run_to(done, Phase.SUCCEEDED)
    failed = Job(params=PARAMS, principal="bob", attempt=2)
    table.add(failed)
    failed.advance(Event.FAIL, status=errors.internal("boom", "WHY"))
    running = Job(params=PARAMS, deadline=time.monotonic() + 100)
    table.add(running)
    run_to(running, Phase.DENOISE, steps=1)
    running.advance(Event.DISPATCH)
    running.advance(Event.CANCEL_LATER, status=errors.cancelled("later"))  # written: a cancel waiting
    queued = Job(params=PARAMS)
    table.add(queued)
    store.close()

    again = store_at(tmp_path)
    loaded = {job.id: job for job in again.load()}
    assert list(loaded) == [done.id, failed.id, running.id, queued.id]  # submission order
    for job in (done, failed, queued):
        assert fields(loaded[job.id]) == fields(job)
    back = loaded[running.id]
    assert back.phase is Phase.DENOISE and back.cancel_status.message == "later" and back.step == 1  # as of the last write (the cancel)
    assert abs(back.deadline - running.deadline) < 0.05  # kept as a wall-clock time
    assert loaded[done.id].artifact.file_name == f"{done.id}.npy" and loaded[done.id].events[-1].HasField("completed")
    assert loaded[done.id].deadline is None and loaded[done.id].params.images[0].data == PARAMS.images[0].data
    again.close()


def test_events_encoding():
    events = [pb.JobEvent(job_id="j", sequence=n, queued=pb.Queued(position=n)) for n in range(1, 4)]
    assert decode_events(encode_events(events)) == events and decode_events(b"") == []
    with pytest.raises(Exception):
        decode_events(encode_events(events)[:-1])


def test_written_on_phase_changes_not_on_steps(tmp_path):
    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    job = Job(params=pb.GenerationParams(prompt="x", num_inference_steps=50))
    table.add(job)
    assert store.writes == 1  # the submit itself, before add returns
    run_to(job, Phase.SUCCEEDED)
    # ADMIT, ENCODE→PREPARE, PREPARE→DENOISE, the last STEP (→DECODE), DECODE→SAVE, SAVE→SUCCEEDED
    assert store.writes == 1 + 6
    assert len(job.events) > 50
    store.close()


def test_under_a_loop_a_submit_is_written_at_once_and_phase_changes_once_per_turn(tmp_path):
    """add() commits before it returns; the phase changes of one loop turn go out together in the
    next one (read back through a second connection, as a restarted scheduler would)."""
    import asyncio

    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    reader = sqlite3.connect(tmp_path / "state" / "jobs.sqlite3")

    def phases() -> list[str]:
        return [row[0] for row in reader.execute("SELECT phase FROM jobs ORDER BY seq")]

    async def main():
        a, b = Job(params=PARAMS), Job(params=PARAMS)
        table.add(a)
        table.add(b)
        assert phases() == ["queued", "queued"] and store.writes == 2
        a.advance(Event.ADMIT, worker_id="w1")
        a.advance(Event.DISPATCH)
        a.advance(Event.DONE)
        b.advance(Event.CANCEL, status=errors.cancelled())
        assert phases() == ["queued", "queued"]  # not yet: at the end of this turn
        await asyncio.sleep(0)
        assert phases() == ["prepare", "cancelled"] and store.writes == 3  # one transaction

    asyncio.run(main())
    reader.close()
    store.close()


def test_an_older_schema_is_upgraded_and_a_newer_one_refused(tmp_path):
    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    job = Job(params=PARAMS)
    table.add(job)
    store.close()
    newer = MIGRATIONS + [("ALTER TABLE jobs ADD COLUMN note TEXT NOT NULL DEFAULT ''",)]
    upgraded = store_at(tmp_path, migrations=newer)
    assert [j.id for j in upgraded.load()] == [job.id]
    upgraded.close()
    path = tmp_path / "state" / "jobs.sqlite3"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    with pytest.raises(StoreError) as info:  # this version reads up to SCHEMA_VERSION
        store_at(tmp_path)
    assert str(path) in str(info.value) and "newer diffserve" in str(info.value) and "move the file aside" in str(info.value)


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "state" / "jobs.sqlite3"
    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    for n in range(200):
        table.add(Job(params=pb.GenerationParams(prompt="x" * 500, seed=n)))
    store.close()
    data = path.read_bytes()
    assert len(data) > 64 << 10

    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(StoreError) as info:
        store_at(tmp_path).load()
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "move it aside" in message

    for broken in (b"", b"garbage" * 1000, b"SQLite format 3\0" + b"\xff" * 5000):
        path.write_bytes(broken)
        with pytest.raises(StoreError) as info:
            store_at(tmp_path).load()
        assert str(path) in str(info.value) and "move it aside" in str(info.value)

    path.unlink()
    foreign = sqlite3.connect(path)
    foreign.execute("CREATE TABLE other (x)")
    foreign.commit()
    foreign.close()
    with pytest.raises(StoreError) as info:
        store_at(tmp_path)
    assert "not a diffserve job store" in str(info.value)


def test_a_state_folder_that_cannot_be_used_is_named(tmp_path):
    (tmp_path / "state").write_text("a file where the folder should be")
    with pytest.raises(StoreError) as info:
        store_at(tmp_path)
    assert "cannot open the job store" in str(info.value) and str(tmp_path / "state") in str(info.value)


def test_a_second_scheduler_cannot_open_a_store_in_use(tmp_path):
    store = store_at(tmp_path)
    with pytest.raises(StoreError) as info:
        store_at(tmp_path)
    assert "in use by another diffserve scheduler" in str(info.value)
    store.close()
    store_at(tmp_path).close()  # released on close (and by the kernel when the process dies)


def _ended_at(job: Job, seconds: float) -> None:
    job.ended = timestamp_pb2.Timestamp(seconds=int(seconds))


def test_retention_drops_the_oldest_finished_jobs_with_their_artifacts(tmp_path):
    store = store_at(tmp_path)
    dropped = []
    table = JobTable(max_finished=2, ttl_s=3600, on_drop=dropped.append)
    table.attach(store)
    jobs = [Job(params=PARAMS) for _ in range(5)]
    for job in jobs:
        table.add(job)
    running = jobs[4]
    for job in jobs[:4]:
        run_to(job, Phase.SUCCEEDED)
    assert dropped == jobs[:2] and [table.get(j.id) for j in jobs[:2]] == [None, None]  # oldest finished first
    assert [j.id for j in store.load()] == [j.id for j in jobs[2:]]
    # time-to-live: a finished job that ended more than ttl_s ago goes; a running one never does
    _ended_at(jobs[2], time.time() - 7200)
    _ended_at(jobs[3], time.time() - 60)
    assert table.evict() == [jobs[2]] and dropped[-1] is jobs[2]
    assert [j.id for j in store.load()] == [jobs[3].id, running.id] and table.get(running.id) is running
    store.close()


def test_retention_deletes_the_artifact_after_the_row(tmp_path):
    store = store_at(tmp_path)
    order = []
    table = JobTable(max_finished=0, on_drop=lambda job: order.append(("artifact", [j.id for j in store.load()])))
    table.attach(store)
    job = Job(params=PARAMS)
    table.add(job)
    run_to(job, Phase.SUCCEEDED)
    assert order == [("artifact", [])]  # the row was gone when the artifact went
    store.close()


def test_a_failed_submit_write_is_refused_and_forgotten(tmp_path):
    store = store_at(tmp_path)
    table = JobTable()
    table.attach(store)
    store._db.execute("PRAGMA query_only = ON")  # every write fails from now on
    job = Job(params=PARAMS, client_request_id="k")
    with pytest.raises(errors.RequestError) as info:
        table.add(job)
    assert info.value.status.code == 14 and "cannot write the job store" in info.value.status.message
    assert table.get(job.id) is None and table.by_client_id(job.principal, "k") is None
    store._db.execute("PRAGMA query_only = OFF")
    store.flush()
    assert store.load() == []
    store.close()


def test_the_engine_restores_every_job_where_it_belongs(tmp_path):
    """Finished jobs stay as they were; queued ones are queued again in their order; a running job
    is QUEUED again with a `restarted` event (attempt 2), or FAILED past max_attempts; a waiting
    cancel ends its job; idempotency keys and deadlines survive; retention applies."""
    outputs = LocalArtifactStore(tmp_path / "outputs")
    first = Engine(EngineConfig(max_attempts=2), link=None, artifacts=outputs)
    first.restore(store_at(tmp_path))
    table = first._jobs
    done = Job(params=PARAMS, client_request_id="done-key")
    running = Job(params=PARAMS)
    last_try = Job(params=PARAMS, attempt=2)
    cancelling = Job(params=PARAMS)
    queued = [Job(params=PARAMS, client_request_id=f"q{n}", deadline=time.monotonic() + 600) for n in range(3)]
    for job in (done, running, last_try, cancelling, *queued):
        table.add(job)
    run_to(done, Phase.SUCCEEDED)
    run_to(running, Phase.DENOISE, steps=2)
    run_to(last_try, Phase.DECODE)
    run_to(cancelling, Phase.ENCODE).advance(Event.DISPATCH)
    cancelling.advance(Event.CANCEL_LATER, status=errors.cancelled("bye"))
    done_events = list(done.events)
    first._jobs.store._db.close()  # "killed": no close(), no final flush
    first._jobs.store._db = None
    os.close(first._jobs.store._lock_fd)

    engine = Engine(EngineConfig(max_attempts=2), link=None, artifacts=outputs)
    engine.restore(store_at(tmp_path))
    got = {job.id: job for job in engine.list_jobs()}
    assert list(got) == [j.id for j in (done, running, last_try, cancelling, *queued)]
    assert got[done.id].phase is Phase.SUCCEEDED and got[done.id].events == done_events
    assert engine._jobs.by_client_id(done.principal, "done-key") is got[done.id]
    again = got[running.id]
    assert again.phase is Phase.QUEUED and again.attempt == 2 and again.step == 0
    restarted = [e.restarted for e in again.events if e.HasField("restarted")]
    assert [(r.attempt, r.reason) for r in restarted] == [(2, "the scheduler restarted")]
    assert got[last_try.id].phase is Phase.FAILED and "attempt 2 of 2" in got[last_try.id].error.message
    assert got[cancelling.id].phase is Phase.CANCELLED and got[cancelling.id].error.message == "bye"
    # the restarted job was submitted first: it leads the queue
    assert [engine.queue_position(got[j.id]) for j in (running, *queued)] == [1, 2, 3, 4]
    assert all(abs(got[j.id].deadline - j.deadline) < 0.05 for j in queued)
    assert engine._jobs.by_client_id(queued[1].principal, "q1") is got[queued[1].id]
    engine.close_store()

    # and what restore decided is on disk: a third start sees the same
    third = Engine(EngineConfig(max_attempts=2, max_jobs=2), link=None, artifacts=outputs)
    third.restore(store_at(tmp_path))
    phases = {job.id: job.phase for job in third.list_jobs()}
    assert phases[running.id] is Phase.QUEUED and done.id not in phases  # max_jobs 2: the oldest finished went
    assert phases[last_try.id] is Phase.FAILED and phases[cancelling.id] is Phase.CANCELLED
    third.close_store()


def test_position_bands():
    assert [position_band(p) for p in (1, 2, 10)] == [1, 2, 10]
    assert [position_band(p) for p in (11, 20, 21, 50, 51, 100, 101, 200, 201, 500, 501, 1000, 1001)] == \
        [20, 20, 50, 50, 100, 100, 200, 200, 500, 500, 1000, 1000, 2000]


def test_a_draining_queue_sends_one_event_per_band_change(tmp_path):
    """1,000 queued jobs leaving one by one: each job hears of its position when it enters a new
    band (a handful of events each), not on every move (which was 500,000 events)."""
    admission = Admission(JobTable(), WorkerRegistry(), link=None, max_queue=10_000, retry_after_s=1.0)
    jobs = [Job(params=PARAMS, created=timestamp_pb2.Timestamp(seconds=1000 + n)) for n in range(1000)]
    admission.restore(jobs)
    assert [j.events[-1].queued.position for j in jobs[:3]] == [1, 2, 3]
    for job in jobs[:-1]:
        admission.withdraw(job, status_pb2.Status(code=1, message="gone"))
    last = jobs[-1]
    positions = [e.queued.position for e in last.events if e.HasField("queued")]
    # 1000, then entering 500, 200, 100, 50, 20, and each of 10..1
    assert positions == [1000, 500, 200, 100, 50, 20, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    total = sum(1 for j in jobs for e in j.events if e.HasField("queued"))
    assert total < 20 * len(jobs)
    assert admission.position(last) == 1


def test_retention_flags(capsys):
    import argparse

    from diffserve.scheduler.app import add_serve_flags, main

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    defaults = parser.parse_args([])
    assert (defaults.job_ttl, defaults.max_jobs, defaults.state_dir) == (7 * 24 * 3600, 10_000, ".diffserve")
    for bad in (["--max-jobs", "0"], ["--job-ttl", "-1"]):
        assert main(bad) == 2  # refused before anything starts
        assert "--max-jobs >= 1" in capsys.readouterr().err
