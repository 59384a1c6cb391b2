"""Any torchvision classification model: sites found by tracing vs Torch-Pruning, one row per model.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_anymodel.py [--max-params 30e6] [--min-params 0] [--models a,b]

Random init, no downloads, num_classes=10, a batch of 2 images (64 px; 224 for ViT/MaxViT, whose
position embeddings fix the size; 96 for Inception v3). For hashexp: sites found / skipped (with
the most common reasons), trace time (trace + walk + numerical check of every site; median of
``--repeats`` rounds of ``harness.interleave``, one by default), the no-op
error (every site keeps all its neurons through the surgery), the planted-duplicate error (a
duplicated neuron merged back, worst of the middle and the last site), and params/FLOPs after
keeping half of every site (the L1-largest half: the widths any method reaches at keep=0.5; the
forward must run). For Torch-Pruning (DependencyGraph + MagnitudePruner, L1, pruning_ratio=0.5,
the classifier ignored): does the pruned model's forward run, and its params/FLOPs (a run past
``--tp-timeout`` seconds, or past the memory cap the command sets, counts as a failure). Also whether
torch.fx.symbolic_trace traces the model (the tracer we did not choose). Models above
``--max-params`` parameters are left out (both tools), said so in the table.
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torchvision

from harness import command_line, interleave, load_average, write_markdown  # noqa: E402  (puts this checkout on sys.path)
from hashexp.merge.discovery import find_sites  # noqa: E402
from hashexp.merge.discovery.checks import noop_error, planted_error  # noqa: E402
from hashexp.merge.surgery import apply_plan, prune_plan  # noqa: E402

HERE = Path(__file__).resolve().parent


def size_of(name: str) -> int:
    """Input side: 224 for ViT/MaxViT (position embeddings fix it), 96 for Inception v3, else 64."""
    if name.startswith(("vit", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    return 64


def flops(model, x) -> int:
    """FLOPs of one eval forward of ``model`` on ``x`` (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def params(model) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def short(reason: str) -> str:
    """A refusal reason with module paths and numbers blanked, so that like reasons count together."""
    import re

    r = reason.split(";")[0]
    r = re.sub(r"\(\d+(, \d+)*\)", "(..)", r)
    r = re.sub(r"(features|layers?|trunk_output|encoder|stages?|blocks?)[\w.\-]*", "<path>", r)
    return re.sub(r"\d+", "#", r)[:70]


def hashexp_row(name: str, m, x, repeats: int = 1) -> dict:
    """hashexp's columns for model ``m`` (changed in place: half of every site is kept at the end)."""
    row = {}
    out = {}
    t = interleave({"find_sites": lambda r: out.update(found=find_sites(m, x))}, repeats=repeats, warmup=0)
    found = out["found"]
    row["trace_s"] = t["find_sites"].median
    row["sites"], row["skipped"] = len(found.sites), len(found.skipped)
    reasons = Counter(short(s.reason) for s in found.skipped if "model output" not in s.reason)
    row["reasons"] = "; ".join(f"{r} (x{c})" for r, c in reasons.most_common(2))
    if not found.sites:
        return row
    m0 = copy.deepcopy(m)
    row["noop"] = noop_error(m0, x, find_sites(m0, x, verify=False).sites)
    picks = list(dict.fromkeys([len(found.sites) // 2, len(found.sites) - 1]))
    worst = 0.0
    for k in picks:
        mp = copy.deepcopy(m)
        worst = max(worst, planted_error(mp, x, find_sites(mp, x, verify=False).sites[k]))
    row["planted"] = worst
    f0, p0 = flops(m, x), params(m)
    for s in found.sites:
        score = s.neuron_vectors().abs().sum(1)
        apply_plan(s, prune_plan(s, torch.topk(score, max(1, round(s.width * 0.5))).indices))
    with torch.no_grad():
        m.eval()(x)
    row["params"], row["flops"] = params(m) / p0, flops(m, x) / f0
    return row


def tp_row(name: str, m, x) -> dict:
    """Torch-Pruning's columns: L1 magnitude pruning at ratio 0.5 (classifier ignored), params/FLOPs after."""
    import torch_pruning as tp

    f0, p0 = flops(m, x), params(m)
    last = [mm for mm in m.modules() if isinstance(mm, torch.nn.Linear) and mm.out_features == 10] or \
           [mm for mm in m.modules() if isinstance(mm, torch.nn.Conv2d) and mm.out_channels == 10]
    kw = {}
    if name.startswith("vit"):
        kw["num_heads"] = {blk.self_attention: blk.num_heads for blk in m.encoder.layers}
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                       ignored_layers=last[-1:], **kw)
    pruner.step()
    with torch.no_grad():
        m.eval()(x)
    return {"params": params(m) / p0, "flops": flops(m, x) / f0}


def fx_ok(m) -> str:
    """'yes' when torch.fx.symbolic_trace traces ``m``, else 'no (error type)'."""
    try:
        torch.fx.symbolic_trace(m)
        return "yes"
    except Exception as e:
        return f"no ({type(e).__name__})"


class TPTimeout(Exception):
    """Torch-Pruning ran past --tp-timeout on one model."""


def _timeout(signum, frame):
    raise TPTimeout("past the time limit")


def main(argv=None) -> int:
    """One row per model, the markdown rewritten after each (a run cut short keeps its rows)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-params", type=float, default=30e6)
    ap.add_argument("--min-params", type=float, default=0.0, help="leave out models with fewer parameters")
    ap.add_argument("--models", default=None)
    ap.add_argument("--tp-timeout", type=float, default=300, help="seconds Torch-Pruning may take per model")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds of the trace per model (median)")
    ap.add_argument("--out", default=str(HERE / "bench_anymodel.md"))
    a = ap.parse_args(argv)
    a.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    a.load0 = load_average()
    torch.set_num_threads(1)
    names = a.models.split(",") if a.models else torchvision.models.list_models(module=torchvision.models)
    # smallest first, so that a run cut short still covers the most models
    names = sorted(names, key=lambda n: torchvision.models.get_model_weights(n).DEFAULT.meta.get("num_params", 0))
    names = [n for n in names if torchvision.models.get_model_weights(n).DEFAULT.meta.get("num_params", 0) >= a.min_params]
    rows = []
    for name in names:
        n_params = torchvision.models.get_model_weights(name).DEFAULT.meta.get("num_params", 0)
        row = {"model": name, "n_params": n_params}
        rows.append(row)
        if n_params > a.max_params:
            row["note"] = f"left out: {n_params / 1e6:.0f}M parameters (> {a.max_params / 1e6:.0f}M) on a 2-core CPU"
            write(a.out, rows, a)
            continue
        s = size_of(name)
        torch.manual_seed(0)
        kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        m = torchvision.models.get_model(name, num_classes=10, **kw).eval()
        x = torch.randn(2, 3, s, s)
        row["fx"] = fx_ok(m)
        try:
            row["hx"] = hashexp_row(name, copy.deepcopy(m), x, a.repeats)
        except Exception as e:
            row["hx"] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
            traceback.print_exc(limit=2)
        signal.signal(signal.SIGALRM, _timeout)
        try:
            try:
                signal.alarm(int(a.tp_timeout))
                row["tp"] = tp_row(name, copy.deepcopy(m), x)
            finally:
                signal.alarm(0)
        except (Exception, MemoryError) as e:  # the alarm may also land in the finally
            row["tp"] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
        print(name, row, flush=True)
        write(a.out, rows, a)
    return 0


def write(path: str, rows: list[dict], a) -> None:
    """The markdown of the rows so far (harness.write_markdown: command and machine line on top)."""
    done = [r for r in rows if "hx" in r]
    hx_ok = sum(1 for r in done if r["hx"].get("sites"))
    hx_run = sum(1 for r in done if "params" in r["hx"])
    tp_ok = sum(1 for r in done if "params" in r["tp"])
    fx = sum(1 for r in done if r.get("fx") == "yes")
    notes = [
        f"torchvision {torchvision.__version__}, 1 thread, random init, batch 2, num_classes=10; load average (1 min) "
        f"at start / now {a.load0:.1f} / {load_average():.1f} (trace seconds are inflated by a shared machine).",
        "", f"Of {len(done)} models run: hashexp finds sites in {hx_ok} and its compressed forward runs in {hx_run} "
        f"(every refusal has a reason); Torch-Pruning's pruned forward runs in {tp_ok}; torch.fx.symbolic_trace "
        f"traces {fx}.", "",
        "Columns: sites/skipped; trace s (trace + walk + numerical check); no-op and planted-duplicate relative "
        "output errors; params and FLOPs after keeping half of every site, as a share of the original; the same "
        "for Torch-Pruning at pruning_ratio=0.5; the two most common refusal reasons (the classifier output, refused "
        "as it reaches the model output, is not counted)."]
    lines = [
        "| model | sites | skipped | trace s | no-op | planted | params | FLOPs | TP params | TP FLOPs | fx | refusals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['model']} | | | | | | | | | | | {r['note']} |")
            continue
        if "hx" not in r:
            continue
        h, t = r["hx"], r["tp"]
        hcols = [f"error: {h['error']}"] + [""] * 7 if "error" in h else [
            str(h["sites"]), str(h["skipped"]), f"{h['trace_s']:.2f}",
            f"{h['noop']:.1e}" if "noop" in h else "", f"{h['planted']:.1e}" if "planted" in h else "",
            f"{h['params']:.2f}" if "params" in h else "", f"{h['flops']:.2f}" if "flops" in h else "",
            h.get("reasons", "")]
        tcols = [f"{t['params']:.2f}", f"{t['flops']:.2f}"] if "params" in t else [f"fails: {t['error']}", ""]
        lines.append("| " + " | ".join([r["model"]] + hcols[:7] + tcols + [r.get("fx", ""), hcols[7]]) + " |")
    write_markdown(path, "Any torchvision model: sites found by tracing vs Torch-Pruning", lines, notes=notes,
                   command="OMP_NUM_THREADS=1 nice -n 10 " + command_line(a.argv))


if __name__ == "__main__":
    sys.exit(main())
