"""Samplers against diffusers: HostUniPC (host-side coefficients, no device sync per step) gives
diffusers' UniPCMultistepScheduler's results over whole schedules, step by step."""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffserve.worker.samplers import SamplerFactory
from diffserve.worker.samplers.unipc import HostUniPC

WAN = {  # Wan2.1's scheduler_config.json (the tiny checkpoints' too)
    "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
    "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 2, "solver_type": "bh2", "predict_x0": True,
    "lower_order_final": True, "final_sigmas_type": "zero", "disable_corrector": [],
}


def _run(cls, config: dict, steps: int, seed: int = 0) -> list[torch.Tensor]:
    sampler = cls.from_config(config)
    sampler.set_timesteps(steps, device="cpu")
    sampler.set_begin_index(0)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 2, 6, 5, generator=g)
    out = []
    for t in sampler.timesteps:
        flow = torch.randn(sample.shape, generator=g)
        sample = sampler.step(flow, t, sample, return_dict=False)[0]
        out.append(sample)
    return out


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("variant", [
    {}, {"flow_shift": 5.0},
    # bh1, or order 2 at the last step, down to sigma 0 is inf/NaN in diffusers itself: stop at sigma_min
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
])
def test_host_unipc_equals_diffusers_bit_for_bit(steps, variant):
    config = {**WAN, **variant}
    ours, ref = _run(HostUniPC, config, steps), _run(UniPCMultistepScheduler, config, steps)
    assert len(ours) == len(ref) == steps
    assert torch.isfinite(ref[-1]).all()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", [
    {"solver_order": 3},
    # noise prediction (not x0), a DDPM schedule; random "model outputs" overflow it on long schedules
    {"solver_order": 3, "prediction_type": "epsilon", "use_flow_sigmas": False, "predict_x0": False, "final_sigmas_type": "sigma_min"},
])
def test_host_unipc_equals_diffusers_higher_order(variant):
    """Order 3 and the noise-prediction form, 12 steps: einsum's summation order may differ from
    ours in the last bit."""
    config = {**WAN, **variant}
    ours, ref = _run(HostUniPC, config, 12), _run(UniPCMultistepScheduler, config, 12)
    assert torch.isfinite(ref[-1]).all()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_factory_serves_unipc_configs_with_host_unipc():
    assert isinstance(SamplerFactory(WAN).new(4, "cpu"), HostUniPC)
    euler = SamplerFactory({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).new(4, "cpu")
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_no_device_copy_in_the_step(monkeypatch):
    """The update never moves a host scalar to the sample's device (each such copy is a sync on a GPU)."""
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self.dim() == 0 or self.numel() <= 4:
            moved.append((tuple(self.shape), args, kwargs))
        return real_to(self, *args, **kwargs)

    ours = HostUniPC.from_config(WAN)
    ours.set_timesteps(6, device="cpu")
    ours.set_begin_index(0)
    sample = torch.randn(1, 4, 1, 4, 4)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    for t in ours.timesteps:
        sample = ours.step(torch.randn_like(sample), t, sample, return_dict=False)[0]
    device_moves = [m for m in moved if any(isinstance(a, (str, torch.device)) for a in m[1]) or "device" in m[2]]
    assert device_moves == []
