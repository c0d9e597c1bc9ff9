"""worker/cuda_graphs.GraphedForward: one recording per input signature, arguments copied into the
recording's buffers on every call, outputs cloned, least recently used recordings dropped, a
forward that cannot be recorded run eagerly. On the CPU the CUDA capture is replaced by one that
replays by rerunning the forward on the recording's own buffers, which is what a CUDA graph does;
the CUDA capture itself is checked on the GPU (bench/parallel_step.py --cuda-graphs: graph_err)."""

from __future__ import annotations

import logging

import pytest
import torch

from diffserve.worker.cuda_graphs import GraphedForward


class Rerun:
    """A capture that replays by calling the forward again on the buffers it was recorded with."""

    def __init__(self, fn, args, kwargs, pool):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.output = fn(*args, **kwargs)

    def replay(self):
        self.output = self.fn(*self.args, **self.kwargs)  # a CUDA graph writes its output in place
        return self.output


class Failing:
    def __init__(self, fn, args, kwargs, pool):
        raise RuntimeError("operation not permitted when stream is capturing")


def forward(x, scale, *, shift=None, lengths=()):
    out = x * scale + (0 if shift is None else shift)
    return out, [out.sum() + sum(lengths)]


def test_replay_uses_each_calls_arguments_and_returns_fresh_outputs():
    graphed = GraphedForward(forward, capture=Rerun)
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    out1, _ = graphed(x1, torch.tensor(2.0))
    out2, (total,) = graphed(x2, torch.tensor(3.0))
    assert graphed.captures == 1  # same signature: one recording, replayed
    torch.testing.assert_close(out2, x2 * 3)  # not the recording's arguments
    torch.testing.assert_close(total, (x2 * 3).sum())
    torch.testing.assert_close(out1, x1 * 2)  # the first call's output survived the second replay


def test_a_new_signature_is_a_new_recording():
    graphed = GraphedForward(forward, capture=Rerun)
    x = torch.randn(2, 3)
    graphed(x, torch.tensor(1.0))
    graphed(torch.randn(4, 3), torch.tensor(1.0))  # batch size
    graphed(x, torch.tensor(1.0), shift=torch.ones(3))  # an optional tensor present
    out, (total,) = graphed(x, torch.tensor(1.0), lengths=[5, 7])  # python values are part of the key
    graphed(x, torch.tensor(1.0), lengths=[5, 7])
    assert graphed.captures == 4
    torch.testing.assert_close(total, x.sum() + 12)
    graphed(x.double(), torch.tensor(1.0))  # dtype
    assert graphed.captures == 5


def test_least_recently_used_recordings_are_dropped():
    graphed = GraphedForward(forward, max_graphs=2, capture=Rerun)
    a, b, c = (torch.randn(n, 3) for n in (1, 2, 3))
    graphed(a, torch.tensor(1.0))
    graphed(b, torch.tensor(1.0))
    graphed(a, torch.tensor(1.0))  # a is now the most recent
    graphed(c, torch.tensor(1.0))  # drops b
    assert len(graphed.graphs) == 2 and graphed.captures == 3
    graphed(a, torch.tensor(1.0))
    assert graphed.captures == 3
    graphed(b, torch.tensor(1.0))
    assert graphed.captures == 4


def test_a_forward_that_cannot_be_captured_runs_eagerly(caplog):
    graphed = GraphedForward(forward, capture=Failing)
    x = torch.randn(2, 3)
    with caplog.at_level(logging.WARNING):
        out, _ = graphed(x, torch.tensor(2.0))
        out2, _ = graphed(x, torch.tensor(2.0))
    torch.testing.assert_close(out, x * 2)
    torch.testing.assert_close(out2, x * 2)
    assert sum("cannot capture" in r.message for r in caplog.records) == 1  # not retried per call


def test_cpu_tensors_run_eagerly_with_the_cuda_capture():
    graphed = GraphedForward(forward)  # CudaCapture: never tried off the GPU
    x = torch.randn(2, 3)
    out, _ = graphed(x, torch.tensor(2.0))
    torch.testing.assert_close(out, x * 2)
    assert graphed.captures == 0 and not graphed.graphs


def test_graphed_dit_matches_eager(tiny_flux_dit):
    """A real DiT forward (tiny FLUX) replayed from its recording gives the eager output for new inputs."""
    model, make_inputs = tiny_flux_dit
    eager = [model(*make_inputs(seed)) for seed in (1, 2)]
    model.forward = GraphedForward(model.forward, capture=Rerun)
    graphed = [model(*make_inputs(seed)) for seed in (1, 2)]
    assert model.forward.captures == 1
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def tiny_flux_dit():
    from diffserve.worker.models.flux import FluxConfig, FluxTransformer

    torch.manual_seed(0)
    cfg = FluxConfig.from_dict(dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=True,
                                    axes_dims_rope=[4, 6, 6]))
    model = FluxTransformer(cfg).eval()

    def make_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        n, s = 16, 5
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(n, 3)
        return (torch.randn(1, n, 8, generator=g), torch.rand(1, generator=g), torch.randn(1, s, 12, generator=g),
                torch.randn(1, 6, generator=g), ids, torch.zeros(s, 3), torch.full((1,), 3.5))

    with torch.no_grad():
        yield model, make_inputs


def test_auto_captures_only_forwards_of_at_most_max_tokens_per_gpu(caplog):
    """--cuda-graphs auto: latent tokens = the first tensor's elements / 64, per GPU of the group."""
    graphed = GraphedForward(forward, capture=Rerun, max_tokens=8, world_size=2)
    small, large = torch.randn(2, 512), torch.randn(2, 1024)  # 1,024 / 64 / 2 = 8 tokens per GPU; 16
    with caplog.at_level(logging.INFO, logger="diffserve.worker.cuda_graphs"):
        out, _ = graphed(large, torch.tensor(2.0))
        graphed(large, torch.tensor(2.0))
    assert graphed.captures == 0 and len(graphed.eager) == 1  # eager, decided once for the signature
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(out, large * 2)
    out, _ = graphed(small, torch.tensor(3.0))
    assert graphed.captures == 1
    torch.testing.assert_close(out, small * 3)
    everything = GraphedForward(forward, capture=Rerun)  # --cuda-graphs on: no limit
    everything(large, torch.tensor(2.0))
    assert everything.captures == 1
