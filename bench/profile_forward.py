"""Where one DiT forward spends its GPU time, diffserve and diffusers side by side (bench/profiling.py).

    python bench/profile_forward.py [--models wan-1.3b,flux.1-dev] [--sides ours,diffusers] [--compile default]
    python bench/profile_forward.py --tiny      (CPU, tiny configs: checks the script; wall time only)

Same configs, inputs and synthetic weights as bench/dit_forward.py, bf16 on the GPU; one side
built at a time. Prints a bucket table per side (attention, GEMM, Triton, copies, other), GPU
busy vs wall time, and the heaviest kernels; writes $OUT/<date>-<card>-profile.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from common import results_name, write_json
from dit_forward import CASES, tiny_cases
from profiling import print_profile, profile_calls
from synthetic import diffusers_model, free_memory, our_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="wan-1.3b,flux.1-dev")
    p.add_argument("--sides", default="ours,diffusers", help="ours, diffusers, or both")
    p.add_argument("--compile", default="", help="also profile ours compiled with this torch.compile mode")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    cases = tiny_cases() if args.tiny else CASES
    device, dtype = (torch.device("cpu"), torch.float32) if args.tiny else (torch.device("cuda"), torch.bfloat16)
    rows = []
    for name in args.models.split(","):
        if name not in cases:
            p.error(f"unknown model {name}; choose from {','.join(cases)}")
        case, fam = cases[name], cases[name].family
        inputs = fam.inputs(case.config, case.shape, device, dtype)
        calls = 1 if case.slow else 3
        with torch.no_grad():
            for side in args.sides.split(","):
                if side == "ours":
                    model = our_model(fam.our_class(), fam.diffusers_class, case.config, dtype, device).eval()
                    variants = [("ours eager", model)]
                    if args.compile:
                        variants.append((f"ours compile:{args.compile}", torch.compile(model, mode=None if args.compile == "default" else args.compile)))
                    for label, m in variants:
                        fn = (lambda m=m: fam.ours_call(m, inputs))
                        fn()  # compiles, if compiled
                        prof = profile_calls(fn, calls=calls)
                        print_profile(f"{name} {case.label} {label}", prof)
                        rows.append(dict(model=name, shape=case.label, side=label, **prof))
                elif side == "diffusers":
                    model = diffusers_model(fam.diffusers_class, case.config, dtype, device).eval()
                    prof = profile_calls(lambda: fam.diffusers_call(model, inputs), calls=calls)
                    print_profile(f"{name} {case.label} diffusers eager", prof)
                    rows.append(dict(model=name, shape=case.label, side="diffusers eager", **prof))
                else:
                    p.error(f"unknown side {side}")
                model = variants = None
                torch._dynamo.reset()
                free_memory()
        path = write_json(results_name("profile"), rows, (os.environ.get("OUT") or tempfile.mkdtemp()) if args.tiny else None)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
