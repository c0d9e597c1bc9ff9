"""The grouped low-rank terms of a LoRA step (worker/models/lora.py, `RowPlan`): every row's adapters
stacked along the rank and run as two batched GEMMs equal, row by row, the per-adapter sum
`(x A^T B^T + c) * scale * alpha/r` (PEFT's LoRA layer), for rows with no, one or two adapters, ranks
that differ, adapters missing a module, lora_B biases and any input rank; the stacks are built once
per adapter mix and kept while its adapters live, within a byte budget."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffserve.worker.models import lora
from diffserve.worker.models.lora import LoraLayers, LoraModule, LoraWeights

IN, OUT = 24, 40


def adapter(name: str, rank: int, seed: int, *, bias: bool = False, scaling: float = 1.0, dtype=torch.float64,
            modules=("0", "1")) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(name, {m: LoraModule(torch.randn(rank, IN, generator=g, dtype=dtype),
                                            torch.randn(OUT, rank, generator=g, dtype=dtype),
                                            torch.randn(OUT, generator=g, dtype=dtype) if bias else None, scaling)
                              for m in modules})


def model(dtype=torch.float64) -> tuple[nn.Module, LoraLayers]:
    torch.manual_seed(0)
    net = nn.ModuleDict({"0": nn.Linear(IN, OUT), "1": nn.Linear(IN, OUT)}).to(dtype)
    return net, LoraLayers.install(net, ["0", "1"])


def reference(linear: nn.Linear, name: str, x: torch.Tensor, per_row) -> torch.Tensor:
    """Row by row, in float64: the base linear plus each of the row's adapters on its own."""
    rows = []
    for xi, adapters in zip(x.double(), per_row):
        y = xi @ linear.weight.double().T + linear.bias.double()
        for a, s in adapters:
            m = a.modules.get(name)
            if m is not None:
                delta = xi @ m.down.double().T @ m.up.double().T + (0 if m.bias is None else m.bias.double())
                y = y + delta * s * m.scaling
        rows.append(y)
    return torch.stack(rows)


A = adapter("a", 4, 1)
B = adapter("b", 6, 2, bias=True, scaling=2.0)
C = adapter("c", 4, 3, modules=("1",))  # has no pair for module 0
MIXES = {
    "each row its own": [[(A, 0.8)], [(B, 1.0)], [(C, 0.5)], [(A, -1.5)]],
    "none / one / two adapters": [[(A, 0.8)], [], [(A, 0.5), (B, 1.5)], [(B, 1.0)]],
    "CFG pairs": [[(A, 0.8)], [(A, 0.8)], [], [], [(B, 0.3), (C, 1.0)], [(B, 0.3), (C, 1.0)]],
    "one adapter on every row": [[(A, 0.7)]] * 3,
    "two adapters on every row": [[(A, 0.7), (B, 1.2)]] * 3,
    "adapters on the middle rows only": [[], [(C, 1.0)], [(B, 2.0)], []],
    "an adapter on one row": [[], [], [(B, 0.9)]],
}


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("shape", [(5,), (3, 5), ()], ids=["3d", "4d", "2d"])
def test_grouped_low_rank_terms_equal_each_rows_adapters_summed(mix, shape):
    net, layers = model()
    per_row = MIXES[mix]
    x = torch.randn(len(per_row), *shape, IN, dtype=torch.float64)
    with torch.no_grad(), layers.rows(per_row):
        for name in ("0", "1"):
            for _ in range(2):  # the second call runs from the kept stacks
                torch.testing.assert_close(net[name](x), reference(net[name], name, x, per_row), rtol=1e-12, atol=1e-12)


def test_bfloat16_rows_stay_within_bfloat16_rounding_of_the_exact_sum():
    net, layers = model(torch.bfloat16)
    a, b = adapter("a", 8, 1, dtype=torch.bfloat16), adapter("b", 8, 2, dtype=torch.bfloat16, scaling=0.5)
    per_row = [[(a, 0.8)], [(b, 1.3)], [(a, 0.5), (b, 1.5)], []]
    x = torch.randn(4, 16, IN).to(torch.bfloat16)
    with torch.no_grad(), layers.rows(per_row):
        y = net["0"](x)
    ref = reference(net["0"], "0", x, per_row)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_a_rows_low_rank_term_is_the_same_alone_and_beside_other_adapters():
    """The stacks fold scales the same way whatever the mix, so a row's low-rank term depends on its
    own adapters only (here bit for bit: same rank, same per-block GEMM shapes; the base weight is
    zeroed, as the CPU's base GEMM itself rounds differently with the row count)."""
    net, layers = model(torch.float32)
    nn.init.zeros_(net["0"].weight), nn.init.zeros_(net["0"].bias)
    a, b = adapter("a", 4, 1, dtype=torch.float32), adapter("b", 4, 2, dtype=torch.float32)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        with layers.rows([[(b, 0.7)]] * 2):
            alone = net["0"](x)
        with layers.rows([[(a, 1.3)]] * 2 + [[(b, 0.7)]] * 2 + [[]] * 2):
            beside = net["0"](torch.cat([torch.randn(2, 5, IN), x, torch.randn(2, 5, IN)]))[2:4]
    assert torch.equal(alone, beside)


def test_one_adapter_mix_on_every_row_applies_to_fewer_rows_and_a_mixed_one_does_not():
    """A step-cached forward runs its later blocks on some of its rows only (all with one adapter mix)."""
    net, layers = model()
    shared = [[(A, 0.7), (B, 0.2)]] * 4
    x = torch.randn(2, 5, IN, dtype=torch.float64)
    with torch.no_grad(), layers.rows(shared):
        torch.testing.assert_close(net["0"](x), reference(net["0"], "0", x, shared[:2]), rtol=1e-12, atol=1e-12)
    with torch.no_grad(), layers.rows([[(A, 0.7)], [(B, 0.2)], [], []]), pytest.raises(AssertionError, match="all rows"):
        net["0"](x)


class Ops(TorchDispatchMode):
    """The aten ops run under it, views left out (each other op is a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mix", ["each row its own", "none / one / two adapters", "CFG pairs", "one adapter on every row"])
def test_a_step_costs_two_gemms_per_linear_whatever_the_adapter_mix(mix):
    net, layers = model()
    per_row = MIXES[mix]
    x = torch.randn(len(per_row), 5, IN, dtype=torch.float64)
    with torch.no_grad():
        with layers.rows(per_row):
            net["0"](x)  # builds module 0's stacks for this mix
        with layers.rows([list(r) for r in per_row]), Ops() as ops:  # the next step, same mix
            net["0"](x)
    biased = any(a.modules["0"].bias is not None for row in per_row for a, _ in row if "0" in a.modules)
    assert ops.ops == ["addmm", "bmm", "baddbmm_"] + ["add_"] * biased  # one add more for lora_B biases


def test_plans_are_kept_per_adapter_mix_and_dropped_with_their_adapters(monkeypatch):
    net, layers = model()
    a, b = adapter("a", 4, 1), adapter("b", 4, 2)
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    with torch.no_grad():
        with layers.rows([[(a, 1.0)], [(b, 1.0)]]):
            net["0"](x)
            first = layers.plan
        with layers.rows([[(a, 1.0)], [(b, 1.0)]]):
            assert layers.plan is first and "0" in first.stacks
        with layers.rows([[(a, 0.5)], [(b, 1.0)]]):  # another scale: another mix
            assert layers.plan is not first
        assert len(layers.plans) == 2
        del b
        gc.collect()
        with layers.rows([[(a, 1.0)]] * 2):
            pass
        assert len(layers.plans) == 1, "the plans holding b's stacks went with b"
        monkeypatch.setattr(lora, "MAX_PLANS", 2)
        for scale in (0.1, 0.2, 0.3):
            with layers.rows([[(a, scale)]]):
                pass
        assert [k[0][0][1] for k in layers.plans] == [0.2, 0.3], "the least recently used go first"


def test_stacks_of_earlier_mixes_stay_within_kept_bytes_and_the_last_mix_stays_whatever_its_size():
    net, layers = model()
    layers.kept_bytes = 0
    a, b = adapter("a", 4, 1), adapter("b", 4, 2)
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    with torch.no_grad():
        for mix in ([[(a, 1.0)], [(b, 1.0)]], [[(b, 1.0)], [(a, 1.0)]]):
            with layers.rows(mix):
                net["0"](x)
                net["1"](x)
            (kept,) = layers.plans.values()
            assert kept.nbytes == 2 * 2 * (4 * IN + OUT * 4) * 8, "two modules, two blocks of (A, B) in float64"
        with layers.rows([[(a, 1.0)]] * 2):  # one adapter on every row: a scaled copy of A, B as it is
            net["0"](x)
        assert [p.nbytes for p in layers.plans.values()] == [4 * IN * 8]
