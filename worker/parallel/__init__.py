"""Parallelism of a worker group, applied from outside the models.

`state` holds the layout and this rank's process groups (no strategy); `layout` plans a layout
for a pipeline; `plans/<family>.py` is each DiT family's plan, applied once after loading
(`plans.parallelize_pipeline`); `cfg` splits a step's rows, `sequence` shards tokens (Ulysses /
Ring), `tensor` shards heads and MLP widths by a declarative plan, `decode` / `vae` / `tiles`
split the VAE decode.
"""

from diffserve.worker.parallel.state import ParallelDims, ParallelState

__all__ = ["ParallelDims", "ParallelState"]
