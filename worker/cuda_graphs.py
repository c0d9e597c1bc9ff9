"""CUDA graphs for the DiT forward (`--cuda-graphs`): one launch per step instead of thousands.

A DiT forward is a few thousand kernels. On one GPU they are long enough that the CPU launching
them stays ahead; sharded over a worker group each kernel is shorter while the launch stream
grows (the collectives and their copies), and the GPU waits on the CPU (FLUX.1-dev under
Ulysses 2: busy 105 of 193 ms, bench/NOTES.md). `GraphedForward` records the forward once per
input signature and replays it:

- signature: the shapes, dtypes and devices of the tensor arguments and the values of the rest
  (ints, None, lists of ints). A new batch size or resolution is a new graph, captured on first
  sight; at most `max_graphs` are kept (least recently used dropped).
- capture: one eager warm-up call on a side stream (Triton compiles, NCCL connects, cuBLAS picks
  its kernels), then the capture, in thread-local mode (the NCCL watchdog thread keeps polling its
  events). Collectives (all-to-all, all-gather, all-reduce, ring send/recv) are captured with the
  kernels, so every rank of a group must capture the same signatures in the same order, which it
  does: the ranks run the same steps.
- replay: the arguments are copied into the graph's input buffers, the graph runs, and its
  outputs are cloned (the next replay overwrites them). All graphs share one memory pool: they
  never run at the same time and nothing of one is read after another runs.
- A forward that cannot be captured (a host sync, e.g. `.tolist()` on a device tensor) is logged
  once per signature and run eagerly from then on. Tensors off the GPU run eagerly too (CPU).
- where graphs pay (`--cuda-graphs auto`, the default): only while the forward is launch-bound. On
  an H200 a Wan2.1-1.3B forward gains 3.3× at 1,560 latent tokens, 1.3× at 3,600 and nothing from
  ~6,000 on, while each capture holds 50–380 MiB (bench/NOTES.md, graphs_pay.py). So with
  `max_tokens` a signature is captured only if its latent tokens per GPU (all rows) are at most
  that many; larger ones run eagerly. The count is the first tensor argument's elements / 64:
  every DiT here takes its latents first, at 64 elements per token (16 channels × a 2×2 patch, or
  64 packed channels). It depends on the signature alone, so every rank of a group decides the
  same (their captures must match).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

TOKEN_ELEMENTS = 64  # latent elements per DiT token: 16 channels × a 2×2 patch (Wan, HunyuanVideo), 64 packed (FLUX, Qwen-Image)


def _describe(leaf: Any) -> Any:
    if torch.is_tensor(leaf):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    if isinstance(leaf, (int, float, bool, str, type(None))):
        return leaf
    raise TypeError(f"cannot key a CUDA graph on a {type(leaf).__name__} argument")


class CudaCapture:
    """Captures `fn(*args, **kwargs)` on static buffers into a CUDA graph; `replay()` reruns it."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, pool, warmup: int = 1):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn(*args, **kwargs)

    def replay(self):
        self.graph.replay()
        return self.output


class GraphedForward:
    """Drop-in for a module's forward that replays CUDA graphs captured per input signature."""

    def __init__(self, forward: Callable, max_graphs: int = 8, capture: type = CudaCapture, max_tokens: int | None = None,
                 world_size: int = 1):
        self.forward = forward
        self.max_graphs = max_graphs
        self.capture = capture
        self.max_tokens = max_tokens  # None: capture every signature (--cuda-graphs on)
        self.world_size = world_size
        self.graphs: OrderedDict[tuple, tuple[list, Any]] = OrderedDict()  # signature -> (input buffers, capture)
        self.eager: set[tuple] = set()  # signatures that failed to capture
        self.pool = None
        self.captures = 0

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if torch.is_tensor(leaf)]
        if not tensors or (self.capture is CudaCapture and any(t.device.type != "cuda" for t in tensors)):
            return self.forward(*args, **kwargs)
        key = (str(spec), tuple(_describe(leaf) for leaf in leaves))
        if key in self.eager:
            return self.forward(*args, **kwargs)
        entry = self.graphs.get(key)
        if entry is None and not self._pays(tensors[0]):
            log.info("forward of %d latent tokens per GPU runs eagerly (CUDA graphs pay up to %d: --cuda-graph-max-tokens)",
                     tensors[0].numel() // TOKEN_ELEMENTS // self.world_size, self.max_tokens)
            self.eager.add(key)
            return self.forward(*args, **kwargs)
        if entry is None:
            entry = self._record(key, leaves, spec)
            if entry is None:
                return self.forward(*args, **kwargs)
        self.graphs.move_to_end(key)
        buffers, graph = entry
        for buffer, leaf in zip(buffers, leaves):
            if torch.is_tensor(leaf):
                buffer.copy_(leaf)
        return pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, graph.replay())

    def _pays(self, latents: torch.Tensor) -> bool:
        """Whether a graph pays for a forward on these latents (see the module docstring)."""
        return self.max_tokens is None or latents.numel() // TOKEN_ELEMENTS // self.world_size <= self.max_tokens

    def _record(self, key: tuple, leaves: list, spec) -> tuple[list, Any] | None:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        buffers = [leaf.clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(buffers, spec)
        if self.pool is None and self.capture is CudaCapture:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph = self.capture(self.forward, args, kwargs, self.pool)
        except RuntimeError as exc:  # e.g. "operation not permitted when stream is capturing"
            log.warning("cannot capture the forward in a CUDA graph (%s); running it eagerly for this shape", exc)
            self.eager.add(key)
            return None
        self.captures += 1
        self.graphs[key] = (buffers, graph)
        return buffers, graph


def graph_dits(pipeline, max_graphs: int = 8, max_tokens: int | None = None, world_size: int = 1) -> int:
    """Wraps each DiT's forward of a pipeline in a GraphedForward; returns how many. max_tokens:
    capture only forwards of at most that many latent tokens per GPU (None: every forward)."""
    from diffserve.worker.models import dits
    from diffserve.worker.warmup import prepare_attention

    models = dits(pipeline)
    for model in models:
        prepare_attention(model)
        model.forward = GraphedForward(model.forward, max_graphs, max_tokens=max_tokens, world_size=world_size)
    return len(models)
