"""Parallel tiled VAE decode (gloo on CPU): the tiny HunyuanVideo VAE with small spatial and temporal
tiles, its decoder calls spread over 2 and 3 ranks, equals the single-process tiled `vae.decode` on
every rank; each rank computed only its share of the tiles; the decoder's forward is back after
the call; a VAE whose decoder calls are not known to be independent (Wan's time cache) is refused.

One group of 3 processes (2-rank case on a sub-group), forked from a server that imported diffusers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 3
# 3 latent frames -> 9 video frames; 32-pixel tiles every 24 (latent 4, stride 3) and 8-frame chunks
# every 4: 3 temporal chunks x 3 x 3 spatial tiles = 27 independent decoder calls.
SHAPE = (1, 4, 3, 8, 7)
TILES = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
             tile_sample_stride_width=24, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4)


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensor

    from diffserve.worker.parallel import tiles as parallel_tiles

    from tests.fixtures.tiny.hunyuan_video import TINY_HUNYUAN_VAE
    from tests.fixtures.tiny.wan import TINY_WAN_VAE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    pair = dist.new_group([0, 1])
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE).eval()
    vae.enable_tiling(**TILES)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    computed = [0]  # real (not fake) decoder runs on this rank
    forward = type(vae.decoder).forward

    def counting(self, x, *args, **kwargs):
        computed[0] += not isinstance(x, FakeTensor)
        return forward(self, x, *args, **kwargs)

    type(vae.decoder).forward = counting
    out = {}
    with torch.no_grad():
        if rank == 0:
            out["reference"] = vae.decode(z, return_dict=False)[0]
            out["calls"] = computed[0]
        for ranks in (2, 3):
            if rank < ranks:
                computed[0] = 0
                out[f"{ranks}/rank{rank}"] = parallel_tiles.decode_tiles_parallel(vae, z, pair if ranks == 2 else None, rank, ranks)
                out[f"{ranks}/computed{rank}"] = computed[0]
            dist.barrier()
    type(vae.decoder).forward = forward
    out[f"restored/rank{rank}"] = "forward" not in vae.decoder.__dict__
    torch.manual_seed(0)
    try:
        parallel_tiles.decode_tiles_parallel(AutoencoderKLWan(**TINY_WAN_VAE), torch.zeros(1, 16, 1, 2, 2), None, rank, WORLD)
    except ValueError as e:
        out[f"refused/rank{rank}"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outputs() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.get_context("forkserver").set_forkserver_preload(["diffserve.worker.parallel.tiles", "diffusers"])
        mp.start_processes(_rank_main, args=(init_file, tmp), nprocs=WORLD, join=True, start_method="forkserver")
        merged = {}
        for rank in range(WORLD):
            merged.update(torch.load(Path(tmp) / f"rank{rank}.pt"))
        return merged


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_returns_the_single_device_tiled_decode(outputs, ranks):
    ref = outputs["reference"]
    assert ref.shape == (1, 3, 9, 64, 56) and ref.std() > 0.01
    for rank in range(ranks):
        torch.testing.assert_close(outputs[f"{ranks}/rank{rank}"], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ranks", [2, 3])
def test_each_rank_decodes_its_share_of_the_tiles(outputs, ranks):
    total = outputs["calls"]
    assert total >= 4 * ranks, "the case must make many decoder calls"
    shares = [outputs[f"{ranks}/computed{rank}"] for rank in range(ranks)]
    assert sum(shares) == total and max(shares) - min(shares) <= 1, shares


def test_decoder_restored_and_unknown_vae_refused(outputs):
    for rank in range(WORLD):
        assert outputs[f"restored/rank{rank}"]
        assert "AutoencoderKLWan" in outputs[f"refused/rank{rank}"]
