"""Which tracer finds the graph: executing with a recorder vs torch.fx vs torch.export.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_tracers.py [--repeats 3] [--models a,b]

Times the graph capture alone (no site walk, no numerical check) on random-init torchvision
models, batch 2. Each tracer first runs once untimed (a tracer that raises there is reported with
its error and left out); the others are timed with ``harness.interleave`` (every round runs each
once, in a rotated order): median [min, max] seconds, and the ratio of each to the recorder,
the median of the per-round ratios (side by side in one process).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

from harness import command_line, interleave, load_average, write_markdown  # noqa: E402  (puts this checkout on sys.path)
from hashexp.merge.discovery.trace import trace  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = "resnet50,mobilenet_v3_large,efficientnet_b0,densenet121,googlenet,convnext_tiny,swin_t,vit_b_32,maxvit_t"
KINDS = ("recorder", "fx", "export")


def size_of(name: str) -> int:
    """Input side: the ViTs need 224, the convolutional models run at 64."""
    return 224 if name.startswith(("vit", "maxvit")) else 64


def capture(kind: str, m: torch.nn.Module, x: torch.Tensor) -> None:
    """One graph capture of ``m`` on ``x`` with tracer ``kind``."""
    if kind == "recorder":
        trace(m, x)
    elif kind == "fx":
        torch.fx.symbolic_trace(m)
    else:
        torch.export.export(m, (x,), strict=False)


def measure(name: str, repeats: int) -> tuple[dict, dict[str, str]]:
    """(Timings of the tracers that work, {tracer: error} of those that raise) on model ``name``."""
    torch.manual_seed(0)
    kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    m = torchvision.models.get_model(name, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, size_of(name), size_of(name))
    errors: dict[str, str] = {}
    for k in KINDS:  # the untimed warm-up round; a tracer that raises is left out
        try:
            capture(k, m, x)
        except Exception as e:  # noqa: BLE001  (any failure of a tracer is a result)
            errors[k] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
    ok = {k: (lambda r, k=k: capture(k, m, x)) for k in KINDS if k not in errors}
    return interleave(ok, repeats=repeats, warmup=0), errors


def row(name: str, t, errors: dict[str, str]) -> str:
    """One table row: per tracer 'median [min, max]' seconds, fx and export as ratios to the recorder."""
    def cell(k):
        return errors[k] if k in errors else f"{t[k].median:.2f} [{t[k].min:.2f}, {t[k].max:.2f}]"

    def ratio(k):
        return f"{t.ratio(k, 'recorder').median:.1f}x" if k not in errors and "recorder" not in errors else ""

    return f"| {name} | {cell('recorder')} | {cell('fx')} | {ratio('fx')} | {cell('export')} | {ratio('export')} |"


def main(argv=None) -> int:
    """Time the three tracers on each model and write the markdown table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--out", default=str(HERE / "bench_tracers.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    load0 = load_average()
    table = ["| model | recorder s | fx s | fx / recorder | export s | export / recorder |", "|---|---|---|---|---|---|"]
    for name in a.models.split(","):
        t, errors = measure(name, a.repeats)
        table.append(row(name, t, errors))
        print(table[-1], flush=True)
    subset = "" if a.models == MODELS else f" Models: a subset ({a.models}) of the full list ({MODELS})."
    notes = [f"torchvision {torchvision.__version__}, 1 thread, batch 2, random init; seconds: median [min, max] of "
             f"{a.repeats} interleaved rounds after one untimed round (harness.interleave); ratio: median of the "
             f"per-round ratios to the recorder.{subset}",
             "", f"Load average (1 min) at start / end {load0:.1f} / {load_average():.1f} (2 cores shared by other "
             "jobs: absolute seconds are inflated, the ratios are side by side)."]
    write_markdown(a.out, "Graph capture: executing with a recorder vs torch.fx vs torch.export", table,
                   command="OMP_NUM_THREADS=1 nice -n 10 " + command_line(argv=None if argv is None else [sys.argv[0], *argv]),
                   notes=notes)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
