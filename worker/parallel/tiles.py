"""Parallel decode of a tiled VAE (diffusers' tiled / frame-wise decode, e.g. HunyuanVideo's VAE) over
the ranks of a process group, equal to the single-device `vae.decode`.

diffusers' tiled decode calls `vae.decoder` once per overlapping tile (and per temporal chunk), each
call independent of the others, and only then blends the overlaps. Every rank runs that same decode
twice, with the decoder swapped for the duration of the call:

1. call k of the decoder computes tile k if k % size == rank; the other calls return zeros of the
   right shape (found by running the decoder on fake tensors: no compute). The result is discarded.
2. each tile is broadcast from the rank that computed it.
3. the decode runs again and call k returns tile k, so diffusers' own blending runs on the real tiles.

The decoder must keep no state between calls (HunyuanVideo's causal convs pad each call's input by
itself: `TILED_VAES` lists the classes checked for that), and all ranks must decode the same latents,
so they make the same calls in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from diffserve.worker.parallel.vae import swapped_forwards

# VAEs whose decoder calls are independent of each other (no time cache between them)
TILED_VAES = frozenset({"AutoencoderKLHunyuanVideo"})


def tiled_problems(vae: nn.Module, latents: torch.Tensor) -> list[str]:
    """Why `decode_tiles_parallel` cannot split this decode (empty when it can)."""
    if type(vae).__name__ not in TILED_VAES:
        return [f"{type(vae).__name__} is not a VAE whose decoder calls are known to be independent"]
    if latents.dim() != 5:
        return [f"latents must be (B, C, T, H, W), got shape {tuple(latents.shape)}"]
    if not (getattr(vae, "use_tiling", False) or getattr(vae, "use_framewise_decoding", False)):
        return ["tiling is off: the decoder runs once, there is nothing to split"]
    return []


def _output_shape(decoder: nn.Module, tile: torch.Tensor) -> tuple[int, ...]:
    """The decoder's output shape for `tile`, by propagating fake tensors (no compute)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return tuple(type(decoder).forward(decoder, mode.from_tensor(tile)).shape)


@torch.no_grad()
def decode_tiles_parallel(vae: nn.Module, latents: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """`vae.decode(latents, return_dict=False)[0]` with its decoder calls spread over the `size` ranks
    of `group` (None: the default group; `rank` is the rank within it). Call on every rank with the
    same latents; every rank returns the whole video. Raises ValueError, before any communication,
    when the decode cannot be split (see `tiled_problems`)."""
    problems = tiled_problems(vae, latents)
    if problems:
        raise ValueError("cannot decode tiles in parallel: " + "; ".join(problems))
    decoder = vae.decoder
    run = type(decoder).forward
    tiles: list[torch.Tensor] = []
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

    def compute_ours(tile: torch.Tensor) -> torch.Tensor:
        if len(tiles) % size == rank:
            tiles.append(run(decoder, tile))
        else:
            key = tuple(tile.shape)
            if key not in shapes:
                shapes[key] = _output_shape(decoder, tile)
            tiles.append(tile.new_zeros(shapes[key]))
        return tiles[-1].clone()  # diffusers blends in place: keep our copy clean

    with swapped_forwards([(decoder, compute_ours)]):
        vae.decode(latents, return_dict=False)
    for k, tile in enumerate(tiles):
        owner = k % size
        dist.broadcast(tile, src=owner if group is None else dist.get_global_rank(group, owner), group=group)
    calls = iter(tiles)

    def replay(tile: torch.Tensor) -> torch.Tensor:
        out = next(calls, None)
        if out is None:
            raise RuntimeError("the second decode made more decoder calls than the first")
        return out

    with swapped_forwards([(decoder, replay)]):
        video = vae.decode(latents, return_dict=False)[0]
    if next(calls, None) is not None:
        raise RuntimeError("the second decode made fewer decoder calls than the first")
    return video
