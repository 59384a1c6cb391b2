"""A ViT that compresses while it trains: hashed vs vanilla vs the same widths from scratch.

    nice -n 10 .venv/bin/python benchmarks/bench_vit_train.py              # writes bench_vit_train.md
    nice -n 10 .venv/bin/python benchmarks/bench_vit_train.py --smoke      # quick check of the script

Runs (Fashion-MNIST training subset, Adam 1e-3, batch 256, `model=vit`, one thread):

- vanilla: `hashing=none` (the same run bench_vit_oneshot.py compresses);
- hashed: `hashing=simhash hashing.max_error=null schedule=gradual schedule.final_width={site: W}`:
  the sites tracing finds, each block's attention heads (`blocks.{i}.attn.qkv`, 4 heads of 16, in
  features) and feed-forward width (`blocks.{i}.mlp.fc1`, 256), ramp from their full widths to
  the point's widths during the first half of training, then train on at them;
- scratch: the same final widths from the start (`model.heads=H model.head_dim=16
  model.mlp_ratio=F/64`).

A point ``H:F`` keeps H heads and F feed-forward neurons per block. 2:120 is 2.05x fewer FLOPs per
sample, 2:20 is 4.14x: the feed-forward sites alone stop at 2.68x (every FFN neuron but one gone),
so the 4x point needs the heads. (FLOPs count attention's q k^T and weighted values, which
FlopCounterMode missed on the CPU before: vanilla is 7,082,240, not 6,786,304.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import ROOT, fmt, machine_line, run  # noqa: E402  (benchmarks/ is the script's dir)
from bench_vit_oneshot import vit_run_args

POINTS = ("2:120", "2:20")  # 2.05x and 4.14x fewer FLOPs
HEAD_DIM, DEPTH = 16, 4


def point_args(point: str) -> tuple[int, int, str, list[str]]:
    """(heads, FFN width, the schedule's final_width override, the scratch model's overrides) of ``H:F``."""
    h, f = (int(v) for v in point.split(":"))
    widths = {**{f"blocks.{i}.attn.qkv": h * HEAD_DIM for i in range(DEPTH)},
              **{f"blocks.{i}.mlp.fc1": f for i in range(DEPTH)}}
    final = "schedule.final_width={" + ",".join(f"{k}:{v}" for k, v in widths.items()) + "}"
    return h, f, final, [f"model.heads={h}", f"model.head_dim={HEAD_DIM}", f"model.mlp_ratio={f / 64}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--subset", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_vit"))
    ap.add_argument("--md", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--points", nargs="+", default=list(POINTS), help="final widths H:F (heads, FFN neurons)")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    out = Path(a.out_dir)
    if a.smoke:
        a.subset, a.epochs, out = 1024, 1, out / "smoke"
    steps = a.epochs * -(-a.subset // 256)
    start, end = max(1, steps // 8), max(2, steps // 2)
    every = max(1, (end - start) // 4)
    rows: dict[str, list[dict]] = {}
    for seed in a.seeds:
        base = vit_run_args(a.subset, a.epochs, seed)
        rows.setdefault("vanilla", []).append(run(base, out / f"vanilla_s{seed}"))
        for p in a.points:
            h, f, final, scratch = point_args(p)
            hashed = [o for o in base if o != "hashing=none"] + [
                "hashing=simhash", "hashing.max_error=null", "schedule=gradual", f"schedule.start={start}",
                f"schedule.end={end}", f"schedule.every={every}", final]
            rows.setdefault(f"hashed -> {p}", []).append(run(hashed, out / f"hashed_h{h}f{f}_s{seed}"))
            rows.setdefault(f"scratch {p}", []).append(run(base + scratch, out / f"scratch_h{h}f{f}_s{seed}"))
    van = rows["vanilla"]
    lines = [
        "# ViT compressing while it trains (Fashion-MNIST): attention heads and feed-forward widths",
        "",
        f"Command: `nice -n 10 .venv/bin/python benchmarks/bench_vit_train.py --seeds {' '.join(map(str, a.seeds))} "
        f"--points {' '.join(a.points)}`" + (" `--smoke`" if a.smoke else ""),
        "",
        f"Machine: {machine_line()} (each run: one intra-op thread).",
        "",
        f"`python -m hashexp {' '.join(vit_run_args(a.subset, a.epochs, 0))}` and the hashed / scratch variants "
        f"(hashed: `hashing=simhash hashing.max_error=null schedule=gradual schedule.start={start} schedule.end={end} "
        f"schedule.every={every} schedule.final_width={{blocks.i.attn.qkv: 16 H, blocks.i.mlp.fc1: F}}`; scratch: "
        f"`model.heads=H model.head_dim=16 model.mlp_ratio=F/64`), point H:F = H heads of 16 and F feed-forward "
        f"neurons per block, {steps} steps, seeds {a.seeds}. Test accuracy on the full test split (majority class "
        f"{100 * van[0]['majority_acc']:.1f}%), mean ± std over seeds; FLOPs per sample of the final network. "
        "Runs one after another on a shared machine: no wall-time ratio is claimed.",
        "",
        "| run | heads per block | FFN width | FLOPs | FLOPs ratio | test acc (%) | drop vs vanilla (pp) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in rows.items():
        w = rs[0]["widths"]
        heads = sorted({v // HEAD_DIM for k, v in w.items() if k.endswith("attn.qkv")}) or [4]
        ffn = sorted({v for k, v in w.items() if k.endswith("mlp.fc1")})
        lines.append(f"| {name} | {'/'.join(map(str, heads))} | {'/'.join(map(str, ffn))} | {rs[0]['flops']:,} | "
                     f"{van[0]['flops'] / rs[0]['flops']:.2f}x | {fmt([r['test_acc'] for r in rs], pct=True)} | "
                     f"{fmt([v['test_acc'] - r['test_acc'] for v, r in zip(van, rs)], pct=True)} |")
    lines.append("")
    Path(a.md).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
