"""Samplers (diffusion noise schedules), one instance per request.

The checkpoint's scheduler/scheduler_config.json names the sampler class (UniPC with flow
prediction for Wan2.1). diffusers' sampler objects carry per-run state (step index, past model
outputs for multistep methods), so every request gets its own instance built from that config.
UniPC is served by our subclass with host-side coefficients (unipc.HostUniPC: the same results,
no device sync per step); every other class is diffusers' own (FlowMatchEuler's step has no sync).
"""

from __future__ import annotations

import json
from pathlib import Path


def _host_side_classes() -> dict:
    from diffserve.worker.samplers.unipc import HostUniPC

    return {"UniPCMultistepScheduler": HostUniPC}


class SamplerFactory:
    """Builds fresh sampler instances from a diffusers scheduler config."""

    def __init__(self, config: dict):
        import diffusers

        host_side = _host_side_classes()
        self.config = dict(config)
        self.class_name = self.config.get("_class_name", "")
        cls = host_side.get(self.class_name) or getattr(diffusers, self.class_name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"unknown sampler class {self.class_name!r} in scheduler_config.json")
        self._cls = cls

    @classmethod
    def from_dir(cls, path: str | Path) -> "SamplerFactory":
        return cls(json.loads((Path(path) / "scheduler_config.json").read_text()))

    @property
    def flow_shift(self) -> float:
        return float(self.config.get("flow_shift") or self.config.get("shift") or 1.0)

    def new(self, num_inference_steps: int, device, **set_timesteps_kwargs):
        """A sampler with its timesteps set for one request's run; extra keywords (sigmas, mu, ...)
        go to the sampler's set_timesteps as the reference pipeline passes them."""
        sampler = self._cls.from_config(self.config)
        sampler.set_timesteps(num_inference_steps, device=device, **set_timesteps_kwargs)
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(0)
        return sampler
