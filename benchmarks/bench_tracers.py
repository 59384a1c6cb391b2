"""Which tracer finds the graph: executing with a recorder vs torch.fx vs torch.export.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_tracers.py [--repeats 3] [--models a,b]

Times the graph capture alone (no site walk, no numerical check) on random-init torchvision
models, batch 2, interleaved repeats (recorder, fx, export, recorder, ...): median [min, max]
seconds, and the ratio of each to the recorder's median, measured side by side in one run. A
tracer that raises is reported with its error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hashexp.merge.discovery.trace import trace  # noqa: E402

MODELS = "resnet50,mobilenet_v3_large,efficientnet_b0,densenet121,googlenet,convnext_tiny,swin_t,vit_b_32,maxvit_t"


def size_of(name: str) -> int:
    return 224 if name.startswith(("vit", "maxvit")) else 64


def run(kind: str, m, x) -> float:
    t0 = time.perf_counter()
    if kind == "recorder":
        trace(m, x)
    elif kind == "fx":
        torch.fx.symbolic_trace(m)
    else:
        torch.export.export(m, (x,), strict=False)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_tracers.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    kinds = ("recorder", "fx", "export")
    lines = ["# Graph capture: executing with a recorder vs torch.fx vs torch.export", "",
             f"Command: `OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_tracers.py --repeats {a.repeats}"
             + (f" --models {a.models}" if a.models != MODELS else "") + "`", "",
             f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread, batch 2, random init; "
             "seconds: median [min, max] of interleaved repeats; ratio: median / recorder's median.", ""]
    table = ["| model | recorder s | fx s | fx / recorder | export s | export / recorder |", "|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        torch.manual_seed(0)
        kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        m = torchvision.models.get_model(name, num_classes=10, **kw).eval()
        x = torch.randn(2, 3, size_of(name), size_of(name))
        times: dict[str, list[float]] = {k: [] for k in kinds}
        errors: dict[str, str] = {}
        for _ in range(a.repeats):
            for k in kinds:
                if k in errors:
                    continue
                try:
                    times[k].append(run(k, m, x))
                except Exception as e:
                    errors[k] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        med = {k: statistics.median(v) for k, v in times.items() if v and k not in errors}

        def cell(k):
            if k in errors:
                return errors[k]
            v = times[k]
            return f"{med[k]:.2f} [{min(v):.2f}, {max(v):.2f}]"

        def ratio(k):
            return f"{med[k] / med['recorder']:.1f}x" if k in med and "recorder" in med else ""

        table.append(f"| {name} | {cell('recorder')} | {cell('fx')} | {ratio('fx')} | {cell('export')} | {ratio('export')} |")
        print(table[-1], flush=True)
    lines += table + ["", f"Load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} (2 cores shared by "
                      "other jobs: absolute seconds are inflated, the ratios are side by side)."]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
