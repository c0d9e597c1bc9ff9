"""torch.compile traces the sequence-parallel DiT forward (Ulysses all-to-all, text gathers) as one
graph: no graph breaks on 2 gloo ranks for Wan, FLUX, Qwen-Image and HunyuanVideo, so `--compile` keeps its
fusion in a worker group. Counted with dynamo's explain (no inductor run; CPU, fast)."""

from __future__ import annotations

import torch

from dist_util import run_group


def _explain(rank: int, world: int, init: str) -> None:
    import torch._dynamo as dynamo

    from diffserve.worker.parallel import ParallelDims, ParallelState
    from diffserve.worker.parallel.plans import parallelize
    from test_sequence_parallel import _cases, _hunyuan_case

    torch.set_grad_enabled(False)
    state = ParallelState.init(ParallelDims(ulysses=2), rank, init, torch.device("cpu"))
    for name, model, args in _cases() + [_hunyuan_case()]:
        parallelize(model, state)
        dynamo.reset()
        explained = dynamo.explain(model)(*args)
        reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
        assert explained.graph_break_count == 0, f"{name}: {reasons}"


def test_sequence_parallel_forward_compiles_without_graph_breaks():
    run_group(_explain, 2)
