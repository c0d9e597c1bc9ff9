"""The few-step DMD sampler of FastVideo's distilled models (FastWan), one instance per request.

Step rule (FastVideo `DmdDenoisingStage`, fastvideo/pipelines/stages/denoising.py in
github.com/hao-ai-lab/FastVideo): at each listed timestep t the model's flow prediction v gives a
clean estimate x0 = x_t - sigma_t * v; before the next listed timestep t' the estimate is noised
again with FRESH Gaussian noise, x_t' = (1 - sigma_t') * x0 + sigma_t' * noise. The last step
returns x0. There is no classifier-free guidance.

sigma for a listed timestep is looked up the way FastVideo does it (`pred_noise_to_pred_video`
and `FlowMatchEulerDiscreteScheduler.add_noise`): the nearest entry of a 1000-step training
table of shifted flow sigmas, shift 8 whatever the model's inference flow_shift (FastVideo's
`DMD_TRAINING_NOISE_SHIFT = 8.0`; older FastVideo built `FlowMatchEulerDiscreteScheduler(shift=8.0)`
in `DmdDenoisingStage`), so sigma(1000) = 1 and sigma(t) ~ t / 1000.

The fresh noise comes from the request's own CPU generator (the one that drew its initial noise),
in step order, float32, in FastVideo's (B, F, C, H, W) layout, so a request's result does not
depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# FastVideo's published DMD steps for FastWan2.1-T2V-1.3B (and FastWan2.2-TI2V-5B):
# `FastWan2_1_T2V_480P_Config.dmd_denoising_steps` in fastvideo/configs/pipelines/wan.py.
FASTWAN_DMD_STEPS = (1000, 757, 522)
FASTWAN_DMD_SHIFT = 8.0  # FastVideo DMD_TRAINING_NOISE_SHIFT


def training_sigma_table(shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of a flow-match training schedule, highest noise first, float32."""
    base = torch.linspace(1, num_train_timesteps, num_train_timesteps, dtype=torch.float32).flip(0) / num_train_timesteps
    sigmas = shift * base / (1 + (shift - 1) * base)
    return sigmas * num_train_timesteps, sigmas


class DMDSampler:
    """Holds one request's listed timesteps, their sigmas, its step counter and its generator.

    `step(model_output, timestep, sample, return_dict=False)` has the diffusers sampler signature,
    so pipelines drive it like any other sampler; `timestep` is only checked, the counter decides.
    """

    order = 1

    def __init__(
        self,
        timesteps: Sequence[int],
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        shift: float = FASTWAN_DMD_SHIFT,
        num_train_timesteps: int = 1000,
    ):
        table_t, table_sigma = training_sigma_table(shift, num_train_timesteps)
        listed = torch.tensor([float(t) for t in timesteps], dtype=torch.float32)
        nearest = (table_t[None, :] - listed[:, None]).abs().argmin(dim=1)  # (steps,)
        self.sigmas = table_sigma[nearest].tolist()  # python floats, one per listed timestep
        self.timesteps = listed.to(device)  # what the model is fed, (steps,)
        self.generator = generator
        self.step_index = 0

    def __len__(self) -> int:
        return len(self.sigmas)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        """model_output, sample: (1, C, F, H, W). Returns (next sample,) in float32."""
        i = self.step_index
        if i >= len(self.sigmas):
            raise IndexError("DMD sampler stepped past its last timestep")
        x0 = sample.float() - self.sigmas[i] * model_output.float()  # clean estimate
        self.step_index += 1
        if i + 1 == len(self.sigmas):
            return (x0,)
        sigma_next = self.sigmas[i + 1]
        b, c, f, h, w = sample.shape
        noise = torch.randn((b, f, c, h, w), generator=self.generator, dtype=torch.float32)  # FastVideo's layout
        # -> (B, C, F, H, W); non_blocking: a pageable copy is staged at once, without waiting for the device
        noise = noise.permute(0, 2, 1, 3, 4).to(sample.device, non_blocking=True)
        return ((1 - sigma_next) * x0 + sigma_next * noise,)
