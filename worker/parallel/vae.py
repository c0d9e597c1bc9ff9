"""Parallel decode of Wan video latents (diffusers' `AutoencoderKLWan`, Wan2.1 and Wan2.2 VAEs) over
the ranks of a process group, equal to the single-device `vae.decode` to float rounding.

The latent height is split into contiguous bands of rows, one per rank (uneven heights give
bands that differ by one row). Every rank runs diffusers' own `vae.decode` on its band, frame by
frame with its own time cache, while the decoder's height-coupled layers are swapped, for the
duration of the call, for versions that see the neighbouring bands:

- a convolution with height padding p (3x3x3 causal convs, the 3x3 conv after each upsample)
  first receives p halo rows from the rank above and p from the rank below, zeros at the global
  top and bottom (what the conv's own zero padding gives there), then convolves without height
  padding. A causal conv prepends its cached frames before the exchange, so the halo covers
  them too and each rank's cache only ever holds its own rows;
- the mid-block self-attention (over the whole frame) gathers the frame's full height for the
  keys and values and answers only its own band's queries.

Everything else in the decoder is per pixel or maps a band of rows to the band of output rows
it covers: RMS norm over channels, SiLU, 1x1 convs, the (3,1,1) time convs, nearest 2x
upsampling, Wan2.2's DupUp3D shortcut and 2x2 unpatchify, and the final clamp. `decode_problems`
checks that the decoder holds only these layers, so a layer this module does not know about is
refused rather than decoded wrongly. Finally the output bands are all-gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders import autoencoder_kl_wan as wan_vae
from torch import nn


def row_counts(height: int, size: int) -> list[int]:
    """Latent rows of each rank's band: contiguous, the first `height % size` bands one row longer."""
    base, extra = divmod(height, size)
    return [base + (r < extra) for r in range(size)]


@dataclass
class _Band:
    """This rank's band of rows and the exchanges with the other bands. `counts` are latent rows;
    every band is upsampled by the same factor, so the counts at any resolution follow from the
    local row count."""

    group: object
    rank: int
    size: int
    counts: list[int]

    def counts_at(self, rows: int) -> list[int]:
        factor, rest = divmod(rows, self.counts[self.rank])
        assert rest == 0 and factor >= 1, f"{rows} rows is not a multiple of the {self.counts[self.rank]}-row band"
        return [c * factor for c in self.counts]

    def halo(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """(..., rows, W) -> (..., p + rows + p, W): the neighbours' edge rows, zeros at the global edges."""
        assert x.shape[-2] >= p, f"a {x.shape[-2]}-row band cannot give a {p}-row halo"
        shape = (*x.shape[:-2], p, x.shape[-1])
        above, below = x.new_zeros(shape), x.new_zeros(shape)
        ops = []
        if self.rank > 0:
            ops += [dist.P2POp(dist.isend, x[..., :p, :].contiguous(), group=self.group, group_peer=self.rank - 1),
                    dist.P2POp(dist.irecv, above, group=self.group, group_peer=self.rank - 1)]
        if self.rank < self.size - 1:
            ops += [dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), group=self.group, group_peer=self.rank + 1),
                    dist.P2POp(dist.irecv, below, group=self.group, group_peer=self.rank + 1)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return torch.cat([above, x, below], dim=-2)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every band of x (..., rows, W) stacked to the full height (..., H, W), on every rank."""
        counts = self.counts_at(x.shape[-2])
        longest = max(counts)
        x = F.pad(x, (0, 0, 0, longest - x.shape[-2])).contiguous()  # all_gather needs equal shapes
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([part[..., :n, :] for part, n in zip(parts, counts)], dim=-2)


# ---- band-aware forwards of the height-coupled decoder layers ----

def _causal_conv3d(conv: wan_vae.WanCausalConv3d, band: _Band, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    """WanCausalConv3d.forward with the height padding taken from the neighbouring bands."""
    pad_w, _, pad_h, _, pad_t, _ = conv._padding  # F.pad order: (w, w, h, h, time before, 0)
    if cache_x is not None and pad_t > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pad_t -= cache_x.shape[2]
    x = band.halo(x, pad_h)  # after the cached frames are prepended: they need their halo too
    if pad_t > 0:  # causal: zero frames in front only
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, 0, pad_w), conv.dilation, conv.groups)


def _conv2d(conv: nn.Conv2d, band: _Band, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward ((B*T, C, rows, W)) with the height padding taken from the neighbouring bands."""
    x = band.halo(x, conv.padding[0])
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


def _attention(block: wan_vae.WanAttentionBlock, band: _Band, x: torch.Tensor) -> torch.Tensor:
    """WanAttentionBlock.forward for this band's queries against the whole frame's keys and values."""
    b, c, t, rows, w = x.shape
    top = sum(band.counts_at(rows)[: band.rank])
    full = band.gather(x)  # (B, C, T, H, W)
    h = full.shape[-2]
    frames = block.norm(full.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    # (B*T, 1, H*W, 3C) laid out as diffusers lays it out, so SDPA sums in the same order
    qkv = block.to_qkv(frames).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
    q, k, v = qkv.chunk(3, dim=-1)  # (B*T, 1, H*W, C) each: one head
    q = q[:, :, top * w : (top + rows) * w]  # this band's queries (tokens are row-major)
    out = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, rows*W, C)
    out = block.proj(out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, rows, w))
    return out.view(b, t, c, rows, w).permute(0, 2, 1, 3, 4) + x


# Decoder layers that are per pixel, or map a band of rows to the band of rows it covers, or are
# containers whose forward only sequences these (checked by class, so a new layer is refused).
_LOCAL = (
    wan_vae.WanDecoder3d, wan_vae.WanMidBlock, wan_vae.WanUpBlock, wan_vae.WanResidualUpBlock,
    wan_vae.WanResidualBlock, wan_vae.WanRMS_norm, wan_vae.DupUp3D,
    nn.Sequential, nn.ModuleList, nn.SiLU, nn.Dropout, nn.Identity,
)


def _swaps(decoder: nn.Module) -> tuple[list[tuple[nn.Module, Callable]], list[str]]:
    """The decoder's height-coupled modules with their band-aware forwards, and the reasons the
    decoder cannot be split exactly (empty when it can)."""
    swaps, problems = [], []
    skip = set()  # modules inside a swapped attention block
    for name, m in decoder.named_modules():
        if m in skip:
            continue
        if isinstance(m, (wan_vae.WanCausalConv3d, nn.Conv2d)):
            kh, sh, dh, ph = m.kernel_size[-2], m.stride[-2], m.dilation[-2], m.padding[-2]
            if isinstance(m, wan_vae.WanCausalConv3d):
                ph = m._padding[2]
            if kh == 1 and ph == 0 and sh == 1:
                continue  # pointwise over height
            if kh != 2 * ph + 1 or sh != 1 or dh != 1 or m.padding_mode != "zeros":
                problems.append(f"{name}: height kernel {kh}, stride {sh}, dilation {dh}, padding {ph} "
                                f"({m.padding_mode}) is not a same-size convolution")
            swaps.append((m, _causal_conv3d if isinstance(m, wan_vae.WanCausalConv3d) else _conv2d))
        elif isinstance(m, wan_vae.WanAttentionBlock):
            swaps.append((m, _attention))
            skip.update(m.modules())
        elif isinstance(m, wan_vae.WanResample):
            if m.mode not in ("none", "upsample2d", "upsample3d"):
                problems.append(f"{name}: resample mode {m.mode!r} in a decoder")
        elif isinstance(m, wan_vae.WanUpsample):
            if m.mode not in ("nearest", "nearest-exact") or any(float(s) != int(s) for s in m.scale_factor):
                problems.append(f"{name}: upsampling {m.mode} x{m.scale_factor} is not a whole-pixel repeat")
        elif not isinstance(m, _LOCAL):
            problems.append(f"{name}: {type(m).__name__} is not known to be local in height")
        if hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook"):
            problems.append(f"{name}: has an offload hook; decode with the decoder resident on the device")
    return swaps, problems


def decode_problems(vae: nn.Module, latents: torch.Tensor) -> list[str]:
    """Why `decode_parallel` cannot decode these latents with this VAE exactly (empty when it can)."""
    if not isinstance(vae, wan_vae.AutoencoderKLWan):
        return [f"{type(vae).__name__} is not an AutoencoderKLWan"]
    if latents.dim() != 5:
        return [f"latents must be (B, C, T, H, W), got shape {tuple(latents.shape)}"]
    problems = _swaps(vae.decoder)[1]
    ratio = vae.spatial_compression_ratio
    h, w = latents.shape[-2:]
    if vae.use_tiling and (h > vae.tile_sample_min_height // ratio or w > vae.tile_sample_min_width // ratio):
        problems.append("the VAE has tiling enabled and these latents would be tiled (blended tiles are not "
                        "what a band split computes); call vae.disable_tiling()")
    return problems


def _bound(forward: Callable, module: nn.Module, band: _Band) -> Callable:
    return lambda *args, **kwargs: forward(module, band, *args, **kwargs)


@contextmanager
def swapped_forwards(swaps: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Sets each module's forward to its callable for the duration, restoring what was there on exit
    (an instance-level forward if the module had one, else the class's)."""
    saved = []
    for module, forward in swaps:
        saved.append((module, module.__dict__.get("forward")))
        module.forward = forward
    try:
        yield
    finally:
        for module, own in saved:
            if own is None:
                del module.forward
            else:
                module.forward = own


def _band_aware(decoder: nn.Module, band: _Band):
    """Swaps the decoder's height-coupled forwards for band-aware ones, restoring them on exit."""
    return swapped_forwards([(module, _bound(forward, module, band)) for module, forward in _swaps(decoder)[0]])


@torch.no_grad()
def decode_parallel(vae: nn.Module, latents: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """`vae.decode(latents, return_dict=False)[0]` computed by the `size` ranks of `group` together.

    Call on every rank of `group` (`rank` is the rank within it, None means the default group)
    with the same latents (B, C, T, H, W); every rank returns the whole decoded video
    (B, 3, frames, H*s, W*s). When the latent height is smaller than `size`, every rank decodes
    the whole video alone (no communication). Raises ValueError, before any communication, when
    the decode cannot be split exactly (see `decode_problems`). The VAE's modules are swapped
    during the call, so no other thread may use `vae` meanwhile (diffusers' decode keeps its time
    cache on the VAE object, so it never could).
    """
    problems = decode_problems(vae, latents)
    if problems:
        raise ValueError("cannot decode in parallel: " + "; ".join(problems))
    height = latents.shape[-2]
    if size == 1 or height < size:
        return vae.decode(latents, return_dict=False)[0]
    band = _Band(group, rank, size, row_counts(height, size))
    top = sum(band.counts[:rank])
    with _band_aware(vae.decoder, band):
        video = vae.decode(latents[..., top : top + band.counts[rank], :], return_dict=False)[0]
    return band.gather(video)


@dataclass
class ParallelDecoder:
    """Decodes with `vae` over the ranks of `group` (see `decode_parallel`): the hook a pipeline's
    decode stage calls on every rank in place of `vae.decode(latents, return_dict=False)[0]`."""

    vae: nn.Module
    group: object
    rank: int
    size: int

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_parallel(self.vae, latents, self.group, self.rank, self.size)
