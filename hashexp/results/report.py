"""Summary rows and runs -> results.md (table, failed/unfinished list, commands, plots),
results.csv (one row per group) and runs.csv (one row per run)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hashexp.results.plots import make_plots
from hashexp.results.summary import AGG, summarize
from hashexp.results.vocab import VANILLA

if TYPE_CHECKING:
    from hashexp.results.runs import RunRecord

# runs.csv columns, in order (record fields and metrics.json keys alike).
RUN_FIELDS = [
    "run_dir", "sweep_dir", "date", "status", "superseded", "error", "dataset", "model", "hashing", "hashing_label",
    "schedule", "tag", "variant", "seed", "epochs", "steps", "test_acc", "train_acc", "majority_acc", "acc_delta",
    "flops", "params", "flops_reduction", "params_reduction", "latency_ms", "latency_speedup", "wall_speedup",
    "train_speedup", "wall_time_s", "train_time_s", "hash_time_s", "eval_time_s", "rehashes", "peak_rss_mb",
    "world_size", "widths",
    "widths_before", "vanilla_dir", "groups", "overrides", "command",
]


def _si(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _pm(mean: float | None, std: float | None, fmt: str = "{:.4f}", suffix: str = "") -> str:
    if mean is None:
        return "–"
    s = fmt.format(mean) + suffix
    if std is not None:
        s += " ± " + fmt.replace("+", "").format(std)
    return s


def _widths_str(w: dict[str, float]) -> str:
    if not w:
        return ""
    if len(w) > 6:
        return f"{sum(w.values()):.0f} total over {len(w)} sites"
    return " ".join(f"{k}:{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{k}:{v:.1f}" for k, v in w.items())


def markdown_table(rows: Sequence[dict]) -> str:
    """The summary rows as one markdown table (accuracy next to the majority-class accuracy)."""
    if not rows:
        return "_no finished runs_\n"
    has_tag = any(r.get("tag") for r in rows)
    has_var = any(r.get("variant") for r in rows)
    head = ["dataset", "model", "hashing"] + (["tag"] if has_tag else []) + (["variant"] if has_var else [])
    has_lat = any(r.get("latency_ms_mean") is not None for r in rows)
    head += ["seeds", "test acc", "majority", "Δacc vs vanilla", "FLOPs", "FLOPs ↓"]
    head += ["latency ms", "latency ↓"] if has_lat else []
    head += ["params ↓", "wall speedup", "train speedup", "hash s", "final widths"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["dataset"], r["model"], f"**{r['hashing']}**" if r["hashing"] == VANILLA else r["hashing"]]
        if has_tag:
            cells.append(r.get("tag") or "")
        if has_var:
            cells.append(f"`{r['variant']}`" if r.get("variant") else "")
        cells += [
            f"{r['n']}",
            _pm(r["test_acc_mean"], r["test_acc_std"]),
            _pm(r["majority_acc_mean"], None),
            _pm(r["acc_delta_mean"], r["acc_delta_std"], "{:+.4f}"),
            _si(r["flops_mean"]),
            _pm(r["flops_reduction_mean"], r["flops_reduction_std"], "{:.2f}", "×"),
        ]
        if has_lat:
            cells += [_pm(r.get("latency_ms_mean"), r.get("latency_ms_std"), "{:.3g}"),
                      _pm(r.get("latency_speedup_mean"), r.get("latency_speedup_std"), "{:.2f}", "×")]
        cells += [
            _pm(r["params_reduction_mean"], r["params_reduction_std"], "{:.2f}", "×"),
            _pm(r["wall_speedup_mean"], r["wall_speedup_std"], "{:.2f}", "×"),
            _pm(r["train_speedup_mean"], r["train_speedup_std"], "{:.2f}", "×"),
            _pm(r["hash_time_s_mean"], None, "{:.2f}"),
            _widths_str(r["widths"]),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def problems(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The runs to list as failed or unfinished: not ok, or ok with an error note."""
    return [r for r in runs if r.status != "ok" or r.error]


def problems_section(runs: Sequence[RunRecord]) -> str:
    """The failed and unfinished runs as a markdown list."""
    bad = problems(runs)
    if not bad:
        return "_none_\n"
    lines = []
    for r in sorted(bad, key=lambda r: r.run_dir):
        err = (r.error or "").strip().splitlines()
        lines.append(f"- **{r.status}** `{r.run_dir}` ({r.dataset}, {r.model}, {r.hashing}, "
                     f"seed {r.seed}): {err[0] if err else ''}")
    return "\n".join(lines) + "\n"


def report_markdown(runs: Sequence[RunRecord], rows: Sequence[dict], plots: Sequence[str] = (),
                    out_dir: str | None = None) -> str:
    """results.md: the table, the failed/unfinished runs, the command behind each row, the plots."""
    ok = [r for r in runs if r.status == "ok"]
    n_bad = sum(1 for r in runs if r.status != "ok")
    n_sup = sum(1 for r in ok if r.superseded)
    lat = sorted({r.latency_batch for r in ok if r.latency_batch})
    parts = ["# hashexp results", "",
             f"{len(ok)} finished runs ({n_sup} superseded by a newer run of the same group and seed), "
             f"{n_bad} failed or unfinished. Mean ± std over seeds. FLOPs are forward FLOPs per sample of "
             "the final network; ↓ = vanilla / run, speedup = vanilla time / run time, both against the "
             "vanilla run (hashing=none) of the same dataset, model, initial widths, epochs and seed." + (
                 f" Latency: measured forward time of the final model.pt at batch {lat[0]} (median; all models "
                 "side by side in one process; latency ↓ = vanilla / run)." if lat else ""), "",
             markdown_table(rows), "## Failed / unfinished", "", problems_section(runs)]
    cmds = [(i, r) for i, r in enumerate(rows, 1) if r.get("command")]
    if cmds:
        parts += ["## Commands", ""]
        for i, r in cmds:
            label = " ".join(x for x in (r["dataset"], r["model"], r["hashing"], r.get("tag"), r.get("variant")) if x)
            parts.append(f"{i}. {label}: `{r['command']}`")
        parts.append("")
    if plots:
        parts += ["## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, out_dir) if out_dir else p
            parts.append(f"![{os.path.basename(p)}]({rel})")
        parts.append("")
    return "\n".join(parts)


def _csv_value(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, dt.datetime):
        return v.isoformat(timespec="seconds")
    if v is None:
        return ""
    return v


def write_csv(path: str, records: Sequence[Any], fields: Sequence[str]) -> None:
    """One CSV row per record (a summary row dict or a :class:`RunRecord`), these columns."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = {k: _csv_value(r.get(k)) for k in fields}
            if isinstance(r.get("overrides"), list):
                row["overrides"] = " ".join(r["overrides"])
            w.writerow(row)


def summary_fields(rows: Sequence[dict]) -> list[str]:
    """results.csv columns."""
    base = ["dataset", "model", "hashing", "tag", "variant", "n", "seeds", "n_paired"]
    stats = [f"{m}_{s}" for m in AGG for s in ("mean", "std")]
    return base + stats + ["widths", "widths_before", "command"]


def write_results(runs: Sequence[RunRecord], out_dir: str, plots: bool = True) -> dict[str, Any]:
    """results.md, results.csv, runs.csv and (unless plots=False) the PNGs into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(runs)
    pngs = make_plots(runs, out_dir) if plots else []
    md = report_markdown(runs, rows, pngs, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    write_csv(os.path.join(out_dir, "results.csv"), rows, summary_fields(rows))
    write_csv(os.path.join(out_dir, "runs.csv"), sorted(runs, key=lambda r: r.run_dir), RUN_FIELDS)
    return {"rows": rows, "markdown": md, "plots": pngs,
            "files": [os.path.join(out_dir, n) for n in ("results.md", "results.csv", "runs.csv")] + pngs}
