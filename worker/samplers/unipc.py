"""UniPC (Wan2.1/2.2's sampler) with its coefficients on the host: no device synchronisation per step.

diffusers' UniPCMultistepScheduler keeps its sigmas on the CPU but moves each one it needs to the
sample's device (`self.sigmas[i].to(device)`) and solves the corrector's small linear system there
(`torch.linalg.solve`, which checks its result): several blocking copies and a sync per step, so
the host waits for the GPU to finish the step's forward before it can launch anything else. The
coefficients depend only on the sigmas, which live on the host; this subclass computes them with
the same float32 CPU ops as diffusers and applies them to the device tensors as scalars, so the
step launches its kernels and returns (pipelined steps, docs/decisions.md). On the CPU the result
is diffusers' own, bit for bit (tests/models/test_samplers.py checks both solvers over whole
schedules).

Covered: UniP and UniC, "bh1"/"bh2", any order, x0 or noise prediction. A configuration it does
not cover (a `solver_p`, dynamic thresholding) takes diffusers' own update, syncs included.
"""

from __future__ import annotations

import torch
from diffusers import UniPCMultistepScheduler


class HostUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC, the same results, with every scalar computed on the host."""

    def _host_path(self) -> bool:
        return self.solver_p is None and not self.config.thresholding and self.config.solver_type in ("bh1", "bh2")

    def _coefficients(self, t_index: int, s0_index: int, others: list[int], order: int, corrector: bool):
        """The update's scalars for target sigma t, base sigma s0 and the earlier sigmas `others`:
        (sigma_t/sigma_s0 or alpha_t/alpha_s0, the m0 coefficient, B_h factor, rhos, rks), as diffusers
        computes them, on CPU float32 tensors."""
        sigmas = self.sigmas  # CPU float32
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigmas[t_index])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigmas[s0_index])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        rks = []
        for si in others:
            alpha_si, sigma_si = self._sigma_to_alpha_sigma_t(sigmas[si])
            lambda_si = torch.log(alpha_si) - torch.log(sigma_si)
            rks.append((lambda_si - lambda_s0) / h)
        rk_list = list(rks)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.stack(b)
        if corrector:
            rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        elif rk_list:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        else:
            rhos = []
        if self.predict_x0:
            x_coef, m0_coef, res_coef = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * B_h
        else:
            x_coef, m0_coef, res_coef = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * B_h
        return x_coef, m0_coef, res_coef, rhos, rk_list

    def _differences(self, m0: torch.Tensor, rks: list, order: int) -> list[torch.Tensor]:
        """diffusers' D1s: (m_i - m0) / rk_i for the earlier model outputs."""
        return [(self.model_outputs[-(i + 1)] - m0) / rks[i - 1].item() for i in range(1, order)]

    def multistep_uni_p_bh_update(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, order: int = None, **kwargs):
        if not self._host_path() or sample is None or order is None or args:
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        m0, x = self.model_outputs[-1], sample
        i0 = self.step_index
        x_coef, m0_coef, res_coef, rhos, rks = self._coefficients(i0 + 1, i0, [i0 - i for i in range(1, order)], order, corrector=False)
        x_t = x_coef * x - m0_coef * m0
        if rks:
            pred_res = _weighted_sum(rhos, self._differences(m0, rks, order), x.dtype)  # diffusers' einsum("k,bkc...", rhos, D1s)
            x_t = x_t - res_coef * pred_res
        return x_t.to(x.dtype)

    def multistep_uni_c_bh_update(self, this_model_output: torch.Tensor, *args, last_sample: torch.Tensor = None,
                                  this_sample: torch.Tensor = None, order: int = None, **kwargs):
        if not self._host_path() or last_sample is None or this_sample is None or order is None or args:
            return super().multistep_uni_c_bh_update(this_model_output, *args, last_sample=last_sample, this_sample=this_sample,
                                                     order=order, **kwargs)
        m0, x = self.model_outputs[-1], last_sample
        i0 = self.step_index
        x_coef, m0_coef, res_coef, rhos, rks = self._coefficients(i0, i0 - 1, [i0 - (i + 1) for i in range(1, order)], order, corrector=True)
        x_t = x_coef * x - m0_coef * m0
        d1_t = this_model_output - m0
        last = _as_dtype(rhos[-1], x.dtype) * d1_t
        if rks:
            corr_res = _weighted_sum(rhos[:-1], self._differences(m0, rks, order), x.dtype)
            x_t = x_t - res_coef * (corr_res + last)
        else:
            x_t = x_t - res_coef * (0 + last)
        return x_t.to(this_sample.dtype)


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded as a 1-element tensor of `dtype` would hold it (diffusers' rhos are .to(x.dtype))."""
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


def _weighted_sum(weights: list[float], tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_k w_k * t_k, as einsum("k,bkc...->bc...") computes it for the few k a multistep solver has."""
    total = _as_dtype(weights[0], dtype) * tensors[0]
    for w, t in zip(weights[1:], tensors[1:]):
        total = total + _as_dtype(w, dtype) * t
    return total
