"""Step-level batching: concurrent jobs share step commands and still equal their solo outputs."""

from __future__ import annotations


from jobs_util import npy_output, wait_for, wait_step
from reference import max_level_diff

JOBS = [
    dict(prompt="a cat in the snow", num_inference_steps=8, seed=11),
    dict(prompt="a dog on the beach", num_inference_steps=5, seed=22),
    dict(prompt="a bird over the sea", num_inference_steps=6, seed=33, guidance_scale=1.0),
]
COMMON = dict(height=32, width=32, num_frames=5, output_format="npy")


def settled_status(server, rows: int):
    """Worker counters arrive with heartbeats (1 s apart): wait until they show `rows` transformer
    rows run and no resident job, so a heartbeat from before the jobs cannot be taken for after."""

    def settled():
        (status,) = server.worker_status()
        return status if status.resident_jobs == 0 and status.denoise_rows >= rows else None

    return wait_for(settled, what=f"the worker to report {rows} rows and no resident jobs")


def test_concurrent_jobs_equal_solo_and_share_steps(tiny_wan, start_server):
    server = start_server(tiny_wan, "--max-batch-size", "4")
    client = server.client
    solo = [npy_output(client, client.submit(**COMMON, **job).id) for job in JOBS]
    rows = 2 * 8 + 2 * 5 + 6  # CFG jobs run two rows a step, the third one
    before = settled_status(server, rows)

    first = client.submit(**COMMON, **JOBS[0])
    wait_step(client, first.id, 2)  # the others join while the first is at step >= 2
    rest = [client.submit(**COMMON, **job) for job in JOBS[1:]]
    ids = [first.id] + [j.id for j in rest]
    batched = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    outputs = [npy_output(client, i) for i in ids]

    for ours, alone in zip(outputs, solo):
        assert max_level_diff(ours, alone) <= 2
    assert all(max(sizes) >= 2 for sizes in batched), batched
    assert len(batched[0]) == 8 and len(batched[1]) == 5 and len(batched[2]) == 6
    after = settled_status(server, 2 * rows)
    assert after.batched_step_commands > before.batched_step_commands
    # Fewer step commands than steps: steps were shared.
    assert after.step_commands - before.step_commands < 8 + 5 + 6
    assert after.denoise_rows - before.denoise_rows == rows


def test_max_batch_size_one_never_batches(tiny_wan, start_server):
    server = start_server(tiny_wan, "--max-batch-size", "1")
    client = server.client
    jobs = [client.submit(**COMMON, **job) for job in JOBS]
    for job in jobs:
        sizes = [e.step_completed.batch_jobs for e in client.events(job.id) if e.WhichOneof("event") == "step_completed"]
        assert sizes and set(sizes) == {1}
    status = settled_status(server, 2 * 8 + 2 * 5 + 6)
    assert status.batched_step_commands == 0 and status.step_commands == 8 + 5 + 6


SIZED = [dict(height=32, width=32, num_frames=5), dict(height=48, width=32, num_frames=1), dict(height=32, width=64, num_frames=5)]


def test_jobs_of_different_sizes_pack_into_shared_steps_and_equal_solo(tiny_wan, start_server):
    """Mixed-shape batching (--pack-tokens): jobs of three sizes share step commands (one packed
    forward on the worker), and each output equals its solo run."""
    server = start_server(tiny_wan, "--max-batch-size", "4", "--pack-tokens", "4096")
    client = server.client
    (model,) = client.list_models()
    assert model.packs_mixed_shapes
    jobs = [dict(**job, **size, output_format="npy") for job, size in zip(JOBS, SIZED)]
    solo = [npy_output(client, client.submit(**job).id) for job in jobs]

    first = client.submit(**jobs[0])
    wait_step(client, first.id, 2)
    rest = [client.submit(**job) for job in jobs[1:]]
    ids = [first.id] + [j.id for j in rest]
    batched = [[e.step_completed.batch_jobs for e in client.events(i) if e.WhichOneof("event") == "step_completed"] for i in ids]
    outputs = [npy_output(client, i) for i in ids]
    assert all(max(sizes) >= 2 for sizes in batched), batched  # different sizes shared steps
    for ours, alone in zip(outputs, solo):
        assert ours.shape == alone.shape and max_level_diff(ours, alone) <= 2
