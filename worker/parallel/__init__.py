"""Parallelism of a worker group, applied from outside the models.

`state` holds the layout and this rank's process groups (no strategy); `layout` plans a layout
for a pipeline; `cfg` splits a step's rows, `sequence` shards tokens (Ulysses / Ring), `tensor`
shards heads and MLP widths, `decode` / `vae` / `tiles` split the VAE decode.
"""

from diffserve.worker.parallel.state import ParallelDims, ParallelState

__all__ = ["ParallelDims", "ParallelState"]
