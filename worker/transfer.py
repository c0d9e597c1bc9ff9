"""Host values to the device without waiting for it.

`torch.tensor(values, device="cuda")` builds the tensor on the host and copies it with
non_blocking=False, which ends in a stream synchronisation: the host waits for every kernel queued
so far. In the step path that would undo pipelined steps (docs/architecture.md), so small per-step
inputs built from Python values (embedded guidance, text lengths, row indices) come through here:
built on the host and copied with non_blocking=True (a pageable copy is staged at once, so the host
tensor may go away). On the CPU it is torch.tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """values (Python values, or a tensor built on the host) as a tensor on `device`, copied without a wait."""
    host = values.to(dtype) if torch.is_tensor(values) and dtype is not None else values
    host = host if torch.is_tensor(host) else torch.tensor(host, dtype=dtype)
    return host.to(device, non_blocking=True)
