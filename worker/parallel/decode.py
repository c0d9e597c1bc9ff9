"""VAE decode over the whole worker group: a Wan VAE split by height (parallel/vae.py), a tiled VAE
by tiles (parallel/tiles.py: HunyuanVideo), both exact; otherwise rank 0 decodes alone."""

from __future__ import annotations

import torch

from diffserve.worker.parallel.state import ParallelState


def decode_video(state: ParallelState, vae, latents: torch.Tensor) -> torch.Tensor | None:
    """`vae.decode(latents)`'s video. In a group every rank calls this and every rank gets the
    video, decoded together. Where no split applies, rank 0 decodes alone and the others get None."""
    if not state.distributed:
        return vae.decode(latents, return_dict=False)[0]
    from diffserve.worker.parallel.tiles import decode_tiles_parallel, tiled_problems
    from diffserve.worker.parallel.vae import decode_parallel, decode_problems

    if not decode_problems(vae, latents):
        return decode_parallel(vae, latents, None, state.rank, state.world_size)
    if not tiled_problems(vae, latents):
        return decode_tiles_parallel(vae, latents, None, state.rank, state.world_size)
    return vae.decode(latents, return_dict=False)[0] if state.rank == 0 else None
