"""Where a step's GPU time goes: kernels bucketed by kind from a torch.profiler trace.

`profile_calls(fn)` runs fn a few times under the profiler and returns, per call: wall time,
the time some kernel was running (the union of kernel intervals: `busy_ms`; wall - busy is GPU
idle, i.e. the CPU or a host sync holding the stream), the summed kernel time per bucket
(attention, GEMM, NCCL, Triton, other) and the heaviest kernels. On CPU (no CUDA) it returns
the wall time only. The profiler adds a few microseconds per launch: compare buckets, and treat
`wall_ms` under the profiler as an upper bound.
"""

from __future__ import annotations

import time

import torch

BUCKETS = (  # first match wins; names as CUDA reports them, lower-cased
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("torch elementwise", ("at::native",)),  # torch's own kernels ("elementwise_kernel", "layer_norm_kernel", ...)
    ("triton", ("triton", "_kernel")),  # inductor's triton_* and our kernels/*.py (_norm_kernel, ...)
    ("copy", ("memcpy", "memset", "copy", "cat", "transpose")),
)


def bucket(name: str) -> str:
    low = name.lower()
    for label, words in BUCKETS:
        if any(w in low for w in words):
            return label
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3  # profiler times are microseconds


def profile_calls(fn, calls: int = 3, top: int = 10, active: bool = True) -> dict:
    """Profiles `calls` runs of fn (after one unprofiled run). With active=False (ranks other
    than the one profiled) it only runs fn as often, so collectives stay matched."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    if not active or not cuda:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return dict(wall_ms=round((time.perf_counter() - started) * 1e3 / calls, 2))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - started) * 1e3 / calls
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_bucket: dict[str, float] = {}
    per_name: dict[str, float] = {}
    for e in kernels:
        ms = (e.time_range.end - e.time_range.start) / 1e3 / calls
        per_bucket[bucket(e.name)] = per_bucket.get(bucket(e.name), 0.0) + ms
        per_name[e.name] = per_name.get(e.name, 0.0) + ms
    busy = _union_ms([(e.time_range.start, e.time_range.end) for e in kernels]) / calls
    heaviest = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    # The host side: ops by self CPU time, and the calls that wait for the GPU (a sync per call
    # stalls the launch queue: the GPU idles while the host catches up).
    host = sorted(((a.key, a.self_cpu_time_total / 1e3 / calls, a.count // calls) for a in prof.key_averages()
                   if a.device_type == torch.autograd.DeviceType.CPU), key=lambda r: -r[1])
    syncs = {k: n for k, _, n in host if any(w in k for w in ("Synchronize", "_local_scalar_dense", "cudaMemcpy", "nonzero", "item"))}
    return dict(wall_ms=round(wall, 2), busy_ms=round(busy, 2), kernels_per_call=len(kernels) // calls,
                buckets={k: round(v, 2) for k, v in sorted(per_bucket.items(), key=lambda kv: -kv[1])},
                top=[(name[:90], round(ms, 3)) for name, ms in heaviest],
                host_top=[(k[:90], round(ms, 3), n) for k, ms, n in host[:top]], syncs=syncs)


def print_profile(label: str, p: dict) -> None:
    print(f"\n[profile] {label}: wall {p['wall_ms']} ms/call", end="")
    if "busy_ms" not in p:
        print()
        return
    print(f", GPU busy {p['busy_ms']} ms, {p['kernels_per_call']} kernels/call")
    print("  buckets (summed kernel ms/call): " + ", ".join(f"{k} {v}" for k, v in p["buckets"].items()))
    for name, ms in p["top"]:
        print(f"  {ms:9.3f}  {name}")
    print(f"  host, self CPU ms/call (calls/call); waits for the GPU: {p.get('syncs')}")
    for name, ms, n in p.get("host_top", []):
        print(f"  {ms:9.3f}  ({n:5d})  {name}")
