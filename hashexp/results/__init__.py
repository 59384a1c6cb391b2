"""outputs/ -> tables and plots: every run next to its vanilla twin.

    python -m hashexp.results                         # everything under $HASHEXP_OUTPUTS or outputs/
    python -m hashexp.results outputs --sweep latest  # only the newest multirun
    python -m hashexp.results outputs/multirun/2026-11-28 --since 2026-11-28 --out /tmp/tables --no-plots
    python -m hashexp.results outputs --latency 256     # + measured forward latency of each model.pt

A run dir is any directory holding .hydra/, metrics.json or status.json. Each finished run
(metrics.json) is paired with the vanilla run (hashing=none) of the same dataset, model, initial
widths, epochs and seed -- and the same data, model and optimizer settings where the run's
.hydra/config.yaml says so -- preferring one from the same multirun (speed claims are ratios
measured side by side). The pair gives FLOPs and parameter reductions (vanilla / run), wall-clock
and train-time speedups (vanilla time / run time) and the accuracy change. A tagged vanilla run is
paired with the widest vanilla run of its tag instead (a small network trained from scratch against
the full one; the widest against itself). Runs are grouped by
(dataset, model, hashing, tag, variant) -- the variant names the config keys that differ inside a
hashing, e.g. ``hashing.threshold=0.8`` -- and aggregated as mean +- std over seeds (the newest run
per seed; older repeats are marked superseded). Failed runs (status.json) and unfinished ones
(.hydra/ but no metrics.json) are listed, never fatal.

Writes into --out (default: <first path>/results): results.md (table, failed/unfinished list,
plots, the command behind each row), results.csv (one row per group), runs.csv (one row per run)
and PNG plots. The same steps as a Python API for benchmarks::

    runs = collect_runs(["outputs"])
    rows = summarize(runs)
    print(markdown_table(rows))
    make_plots(runs, "outputs/results")

The package, bottom up: vocab (shared names, colours), runs (discovery, :class:`RunRecord`, the
metrics.json and history.csv readers), pairing (vanilla twins, ratios), summary (groups,
mean ± std), collect (load, pair, label: :func:`collect_runs`), plots, report (markdown, CSV), cli.
"""

from hashexp.results.cli import main
from hashexp.results.collect import collect_runs
from hashexp.results.pairing import pair, pair_signature, ratio
from hashexp.results.plots import make_plots, plot_figures
from hashexp.results.report import (RUN_FIELDS, markdown_table, problems_section, report_markdown, summary_fields,
                                    write_csv, write_results)
from hashexp.results.runs import (RunRecord, find_run_dirs, latest_sweep, load_run, measure_latencies,
                                  read_history, read_metrics)
from hashexp.results.summary import AGG, group_key, summarize
from hashexp.results.vocab import VANILLA

__all__ = [
    "AGG", "RUN_FIELDS", "VANILLA", "RunRecord", "collect_runs", "find_run_dirs", "group_key", "latest_sweep",
    "load_run", "main", "make_plots", "markdown_table", "measure_latencies", "pair", "pair_signature", "plot_figures",
    "problems_section", "ratio", "read_history", "read_metrics", "report_markdown", "summarize", "summary_fields",
    "write_csv", "write_results",
]
