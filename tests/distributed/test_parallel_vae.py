"""Parallel VAE decode (gloo on CPU): the tiny Wan2.1 and Wan2.2 VAEs decoded over 2 and 3 ranks equal
the single-process `vae.decode` on every rank, also with heights that do not divide evenly and with
fewer latent rows than ranks; without the halo exchange the bands differ (so the comparison can fail);
the VAE's own forwards are back after the call; tiling is refused before any communication.

One group of 3 processes runs every case (2-rank cases on a sub-group of ranks 0 and 1), forked
from a server that has imported diffusers, so its ~8 s import is paid once (the test process
itself never imports diffusers).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 3
# name: (VAE, latent shape (B, C, T, H, W), ranks, dtype). 3 latent frames -> 9 video frames, so the
# time cache is used. In float32 the split changes rounding only (elementwise CPU kernels round the
# vectorised body and the tail of a tensor differently), so the parity is to 1e-5; in float64 to 1e-12.
CASES = {
    "wan21-2-ranks": ("wan21", (1, 16, 3, 4, 6), 2, torch.float32),
    "wan21-2-ranks-uneven": ("wan21", (1, 16, 3, 3, 5), 2, torch.float32),  # bands of 2 and 1 rows
    "wan21-3-ranks-uneven": ("wan21", (1, 16, 3, 5, 6), 3, torch.float32),  # 2, 2, 1
    "wan21-3-ranks-uneven-float64": ("wan21", (1, 16, 3, 5, 6), 3, torch.float64),
    "wan21-3-ranks-fewer-rows": ("wan21", (1, 16, 2, 2, 4), 3, torch.float32),  # 2 rows < 3 ranks: each rank alone
    "wan22-2-ranks-uneven-batch2": ("wan22", (2, 48, 3, 3, 4), 2, torch.float32),  # residual, patch 2, 16x
    "wan22-3-ranks": ("wan22", (1, 48, 3, 4, 4), 3, torch.float32),
    "wan22-3-ranks-float64": ("wan22", (1, 48, 3, 4, 4), 3, torch.float64),
}
NO_HALO = "wan21-2-ranks-no-halo"  # the 2-rank case with the halo exchange replaced by zeros
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _vae(kind: str):
    from diffusers import AutoencoderKLWan

    from tests.fixtures.tiny.wan import TINY_WAN_VAE
    from tests.fixtures.tiny.wan22 import TINY_WAN22_VAE

    torch.manual_seed(0)
    return AutoencoderKLWan(**(TINY_WAN_VAE if kind == "wan21" else TINY_WAN22_VAE)).eval()


def _latents(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: decodes every case it takes part in and saves its outputs (rank 0 also the references)."""
    import torch.distributed as dist
    from diffserve.worker.parallel import vae as parallel_vae

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    pair = dist.new_group([0, 1])  # every rank creates every group
    out = {}
    vaes = {kind: _vae(kind) for kind in ("wan21", "wan22")}
    for name, (kind, shape, ranks, dtype) in CASES.items():
        # .double()/.float() rather than .to(dtype), which diffusers warns about
        vae = vaes[kind].double() if dtype == torch.float64 else vaes[kind].float()
        z = _latents(shape).to(dtype)
        if rank == 0:
            out[f"{name}/reference"] = vae.decode(z, return_dict=False)[0]
        if rank < ranks:
            decoder = parallel_vae.ParallelDecoder(vae, pair if ranks == 2 else None, rank, ranks)
            out[f"{name}/rank{rank}"] = decoder.decode(z)

    vaes = {kind: vae.float() for kind, vae in vaes.items()}
    out[f"restored/rank{rank}"] = all("forward" not in m.__dict__ for v in vaes.values() for m in v.modules())

    if rank < 2:
        parallel_vae._Band.halo = lambda self, x, p: torch.nn.functional.pad(x, (0, 0, p, p))
        out[f"{NO_HALO}/rank{rank}"] = parallel_vae.decode_parallel(vaes["wan21"], _latents(CASES["wan21-2-ranks"][1]),
                                                                    pair, rank, 2)

    vaes["wan21"].enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        parallel_vae.decode_parallel(vaes["wan21"], _latents((1, 16, 1, 4, 4)), None, rank, WORLD)
    except ValueError as e:
        out[f"tiling/rank{rank}"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        # A fork server that imports diffusers once, instead of once per spawned rank. It never
        # runs torch ops itself, so forking from it is safe (unlike forking this process).
        mp.get_context("forkserver").set_forkserver_preload(["diffserve.worker.parallel.vae"])
        mp.start_processes(_rank_main, args=(init_file, tmp), nprocs=WORLD, join=True, start_method="forkserver")
        merged = {}
        for rank in range(WORLD):
            merged.update(torch.load(Path(tmp) / f"rank{rank}.pt"))
        return merged


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_returns_the_single_device_decode(outputs, name):
    ref = outputs[f"{name}/reference"]
    kind, (b, _, t, h, w), ranks, dtype = CASES[name]
    scale = 8 if kind == "wan21" else 16
    assert ref.shape == (b, 3, 4 * (t - 1) + 1, h * scale, w * scale) and ref.dtype == dtype
    assert ref.std() > 0.05 and (ref.abs() < 1).float().mean() > 0.9  # neither flat nor clamped
    for rank in range(ranks):
        ours = outputs[f"{name}/rank{rank}"]
        assert ours.shape == ref.shape and ours.dtype == dtype
        torch.testing.assert_close(ours, ref, atol=TOL[dtype], rtol=0, msg=lambda m, rank=rank: f"{name}, rank {rank}: {m}")


def test_bands_without_halo_differ(outputs):
    """The comparison above can fail: decoding the bands independently (zeros for the halo) is far off."""
    ref = outputs["wan21-2-ranks/reference"]
    for rank in range(2):
        assert (outputs[f"{NO_HALO}/rank{rank}"] - ref).abs().max() > 1000 * TOL[torch.float32]


def test_vae_forwards_restored_after_the_call(outputs):
    assert all(outputs[f"restored/rank{rank}"] for rank in range(WORLD))


def test_tiling_refused_on_every_rank(outputs):
    for rank in range(WORLD):
        assert "tiling" in outputs[f"tiling/rank{rank}"]
