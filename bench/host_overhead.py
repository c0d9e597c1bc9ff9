"""Where a launch-bound DiT forward spends its host time (issue 15): ours eager, ours with the
Triton kernels off (torch references), and diffusers eager, timed without a profiler, then a
cProfile of ours by own time.

    python bench/host_overhead.py [--models wan-1.3b-image,flux.1-dev-512] [--calls 10]
    python bench/host_overhead.py --tiny       (CPU, tiny configs: checks the script)

Same configs, inputs and synthetic weights as bench/dit_forward.py. Prints per model: wall ms per
call for each side, GPU time per call (CUDA events), and the 25 Python functions with the most own
time in ours.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from dit_forward import CASES, tiny_cases
from synthetic import diffusers_model, free_memory, our_model


def timed(fn, calls: int) -> tuple[float, float]:
    """(wall ms, GPU ms) per call after two warm-up calls; GPU ms is 0 on the CPU."""
    for _ in range(2):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        end.record()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - began) * 1e3 / calls
    return wall, (start.elapsed_time(end) / calls if cuda else 0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="wan-1.3b-image,flux.1-dev-512")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cases = tiny_cases() if args.tiny else CASES
    device, dtype = (torch.device("cpu"), torch.float32) if args.tiny else (torch.device("cuda"), torch.bfloat16)
    import diffserve.kernels.norm as norm

    for name in args.models.split(","):
        case, fam = cases[name], cases[name].family
        inputs = fam.inputs(case.config, case.shape, device, dtype)
        with torch.no_grad():
            model = our_model(fam.our_class(), fam.diffusers_class, case.config, dtype, device).eval()
            fn = lambda: fam.ours_call(model, inputs)  # noqa: E731
            ours = timed(fn, args.calls)
            saved, norm.triton = norm.triton, None  # use_triton() → False everywhere: the torch references
            try:
                refs = timed(fn, args.calls)
            finally:
                norm.triton = saved
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            profiler.disable()
            model = None
            free_memory()
            theirs_model = diffusers_model(fam.diffusers_class, case.config, dtype, device).eval()
            theirs = timed(lambda: fam.diffusers_call(theirs_model, inputs), args.calls)
            theirs_model = None
            free_memory()
        print(f"\n[host] {name} {case.label}: wall / GPU ms per call — ours {ours[0]:.1f} / {ours[1]:.1f}, "
              f"ours without Triton {refs[0]:.1f} / {refs[1]:.1f}, diffusers {theirs[0]:.1f} / {theirs[1]:.1f}")
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


if __name__ == "__main__":
    main()
