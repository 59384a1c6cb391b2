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
(dataset, model, method, tag, variant) -- the variant names the config keys that differ inside a
method, e.g. ``hashing.threshold=0.8`` -- and aggregated as mean +- std over seeds (the newest run
per seed; older repeats are marked superseded). Failed runs (status.json) and unfinished ones
(.hydra/ but no metrics.json) are listed, never fatal.

Writes into --out (default: <first path>/results): results.md (table, failed/unfinished list,
plots, the command behind each row), results.csv (one row per group), runs.csv (one row per run)
and PNG plots. The same steps as a Python API for benchmarks::

    runs = collect_runs(["outputs"])
    rows = summarize(runs)
    print(markdown_table(rows))
    make_plots(runs, "outputs/results")
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Directories that never hold run dirs (and can be large).
_SKIP_DIRS = {".hydra", ".submitit", "wandb", "__pycache__", ".git"}
# Config keys that say nothing about what was trained: ignored in variants and in pairing.
_NOISE_KEYS = ("seed", "tag", "logger.", "experiment.", "trainer.progress", "trainer.checkpoint",
               "trainer.resume", "trainer.log_every", "trainer.eval_batch_size", "dataset.root",
               "dataset.download", "hashing.n_threads")
# Trainer keys that only act on compressed runs: a vanilla twin may differ in them.
_PAIR_IGNORE = ("trainer.bn_recalib_batches",)
# Model keys that set the initial widths (the small-network-from-scratch baseline varies them).
_WIDTH_KEYS = ("model.widths", "model.width_mult")
_DATE_RE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)([_T ](\d{2})-(\d{2})-(\d{2}))?")
_TIME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})")
VANILLA = "none"

RUN_FIELDS = [
    "run_dir", "sweep_dir", "date", "status", "superseded", "error", "dataset", "model", "method", "hashing",
    "schedule", "tag", "variant", "seed", "epochs", "steps", "test_acc", "train_acc", "majority_acc", "acc_delta",
    "flops", "params", "flops_reduction", "params_reduction", "latency_ms", "latency_speedup", "wall_speedup",
    "train_speedup", "wall_time_s", "train_time_s", "hash_time_s", "eval_time_s", "rehashes", "peak_rss_mb",
    "world_size", "widths",
    "widths_before", "vanilla_dir", "groups", "overrides", "command",
]
_AGG = ["test_acc", "train_acc", "majority_acc", "acc_delta", "flops", "params", "flops_reduction",
        "params_reduction", "latency_ms", "latency_speedup", "wall_speedup", "train_speedup", "wall_time_s",
        "train_time_s", "hash_time_s", "rehashes", "peak_rss_mb"]


# ---------------------------------------------------------------------------- discovery


def _is_run_dir(d: str, names: set[str]) -> bool:
    return "metrics.json" in names or "status.json" in names or (
        ".hydra" in names and os.path.isfile(os.path.join(d, ".hydra", "config.yaml")))


def find_run_dirs(paths: Iterable[str]) -> list[str]:
    """Every run dir under ``paths`` (a path may itself be a run dir); sorted, no duplicates."""
    found: set[str] = set()
    for root in paths:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            continue
        for d, subdirs, files in os.walk(root):
            names = set(files) | set(subdirs)
            if _is_run_dir(d, names):
                found.add(d)
                subdirs[:] = []  # run dirs do not nest
                continue
            subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS)
    return sorted(found)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_yaml(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError):
        return None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "null"
    return str(v)


def _run_date(path: str) -> dt.datetime:
    """Start time from the Hydra dir names (.../<YYYY-MM-DD>/<HH-MM-SS>...), else the dir's mtime."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        m = _DATE_RE.search(parts[i])
        if m:
            y, mo, d = (int(g) for g in m.groups()[:3])
            hh = mm = ss = 0
            if m.group(4):  # compare_2026-11-28_15-17-05
                hh, mm, ss = (int(g) for g in m.groups()[4:])
            elif i + 1 < len(parts):
                t = _TIME_RE.match(parts[i + 1])
                if t:
                    hh, mm, ss = (int(g) for g in t.groups())
            try:
                return dt.datetime(y, mo, d, hh, mm, ss)
            except ValueError:
                break
    return dt.datetime.fromtimestamp(os.path.getmtime(path))


def _sweep_dir(run_dir: str) -> str | None:
    """The multirun dir a job belongs to (Hydra writes multirun.yaml there), or None."""
    d = os.path.dirname(run_dir)
    for _ in range(3):
        if os.path.isfile(os.path.join(d, "multirun.yaml")):
            return d
        d = os.path.dirname(d)
    return None


def _progress(run_dir: str, epochs: Any) -> str:
    """'epoch k/N' from history.csv for an unfinished run."""
    path = os.path.join(run_dir, "history.csv")
    last = None
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("kind") == "epoch":
                    last = row.get("epoch")
    except OSError:
        return "no history.csv"
    if last is None:
        return "no epoch finished"
    return f"epoch {last}/{epochs if epochs is not None else '?'}"


def load_run(run_dir: str) -> dict[str, Any]:
    """One run dir as a flat dict: its metrics.json joined with its group choices and overrides.

    ``status`` is ok (metrics.json), failed (status.json or an unreadable metrics.json) or
    unfinished (only .hydra/ and perhaps history.csv).
    """
    hyd = os.path.join(run_dir, ".hydra")
    cfg = _read_yaml(os.path.join(hyd, "config.yaml"))
    cfg = cfg if isinstance(cfg, dict) else {}
    overrides = _read_yaml(os.path.join(hyd, "overrides.yaml"))
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    run: dict[str, Any] = {"run_dir": run_dir, "sweep_dir": _sweep_dir(run_dir), "overrides": overrides,
                           "config": _flatten(cfg), "error": "", "superseded": False}
    metrics_path = os.path.join(run_dir, "metrics.json")
    status_path = os.path.join(run_dir, "status.json")
    metrics = None
    if os.path.isfile(metrics_path):
        try:
            metrics = _read_json(metrics_path)
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            run["status"], run["error"] = "failed", f"metrics.json unreadable ({e})"
            metrics = None
    status = None
    if os.path.isfile(status_path):
        try:
            status = _read_json(status_path)
        except (OSError, ValueError) as e:
            status = {"status": "failed", "error": f"status.json unreadable ({e})"}
    if metrics is not None:
        run.update(metrics)
        run["status"] = "ok" if metrics.get("status", "ok") == "ok" else str(metrics.get("status"))
        if status is not None and os.path.getmtime(status_path) > os.path.getmtime(metrics_path):
            run["error"] = f"a later attempt failed: {status.get('error', '')} (its earlier metrics.json is used)"
        run["_mtime"] = os.path.getmtime(metrics_path)
    choices: dict[str, str] = {}
    if metrics is None and status is not None:
        run["status"] = "failed"
        run["error"] = str(status.get("error", "unknown error"))
        choices = status.get("groups") or {}
    elif "status" not in run:
        run["status"] = "unfinished"
        run["error"] = _progress(run_dir, _get(cfg, "trainer.epochs"))
    run["groups"] = run.get("groups") or choices or _hydra_choices(hyd)
    c = run["config"]
    for key in ("dataset", "model", "hashing", "schedule"):
        if not run.get(key):
            run[key] = c.get(f"{key}.name") or run["groups"].get(key) or "?"
    if run.get("seed") is None:
        run["seed"] = c.get("seed")
    if run.get("tag") is None:
        run["tag"] = c.get("tag") or ""
    if run.get("epochs") is None:
        run["epochs"] = c.get("trainer.epochs")
    run.setdefault("world_size", 1)
    run.setdefault("_mtime", os.path.getmtime(run_dir))
    run["date"] = _run_date(run_dir)
    run["command"] = "python -m hashexp " + " ".join(shlex.quote(o) for o in overrides)
    return run


def _hydra_choices(hydra_dir: str) -> dict[str, str]:
    """Group choices from .hydra/hydra.yaml (runtime.choices), without Hydra's own groups."""
    h = _read_yaml(os.path.join(hydra_dir, "hydra.yaml"))
    try:
        return {k: str(v) for k, v in h["hydra"]["runtime"]["choices"].items() if not k.startswith("hydra")}
    except (KeyError, TypeError, AttributeError):
        return {}


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _parse_date(s: str | None, end: bool = False) -> dt.datetime | None:
    if s is None:
        return None
    try:
        d = dt.datetime.strptime(s, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"date {s!r} is not YYYY-MM-DD") from None
    return d + dt.timedelta(days=1) - dt.timedelta(microseconds=1) if end else d


def latest_sweep(paths: Iterable[str]) -> str | None:
    """The newest multirun dir (one holding multirun.yaml) under ``paths``."""
    best, best_t = None, -1.0
    for root in paths:
        for d, subdirs, files in os.walk(os.path.abspath(root)):
            if "multirun.yaml" in files:
                t = os.path.getmtime(os.path.join(d, "multirun.yaml"))
                if t > best_t:
                    best, best_t = d, t
                subdirs[:] = []
            else:
                subdirs[:] = [s for s in subdirs if s not in _SKIP_DIRS]
    return best


def collect_runs(paths: Sequence[str], sweep: str | None = None, since: str | None = None,
                 until: str | None = None, latency_batch: int | None = None,
                 latency_repeats: int = 20) -> list[dict[str, Any]]:
    """All runs under ``paths`` (ok, failed and unfinished), finished ones paired with vanilla.

    Args:
        paths: directories to scan recursively (run dirs, multirun dirs or whole output trees).
        sweep: keep only the runs of this multirun dir ("latest": the newest one under paths);
            vanilla twins are still looked up in all of ``paths``.
        since, until: keep runs started on or after / on or before this date (YYYY-MM-DD), taken
            from the run dir's name, else its mtime.
        latency_batch: measure every finished run's forward latency (``latency_ms``) at this batch
            size from its model.pt, all models side by side in this process (see
            :func:`measure_latencies`); None: only where metrics.json already has ``latency_ms``.
        latency_repeats: timed rounds for that measurement.
    Returns:
        one dict per run, with metrics.json's keys plus run_dir, sweep_dir, date, status, error,
        overrides, command, config (the flattened .hydra/config.yaml), method, variant and, where
        a vanilla twin exists, vanilla_dir, flops_reduction, params_reduction, wall_speedup,
        train_speedup, acc_delta and (with latencies) latency_speedup.
    """
    paths = list(paths)
    if sweep == "latest":
        sweep = latest_sweep(paths)
        if sweep is None:
            raise FileNotFoundError(f"no multirun dir (with multirun.yaml) under {', '.join(paths)}")
    if sweep is not None:
        if not os.path.isdir(sweep):
            raise FileNotFoundError(f"--sweep {sweep}: no such directory")
        sweep = os.path.abspath(sweep)
        paths = paths + [sweep]
    runs = [load_run(d) for d in find_run_dirs(paths)]
    if latency_batch is not None:
        measure_latencies(runs, int(latency_batch), repeats=latency_repeats)
    _pair(runs)
    _label(runs)
    lo, hi = _parse_date(since), _parse_date(until, end=True)
    keep = []
    for r in runs:
        if sweep is not None and not (r["run_dir"] + os.sep).startswith(sweep + os.sep):
            continue
        if lo is not None and r["date"] < lo:
            continue
        if hi is not None and r["date"] > hi:
            continue
        keep.append(r)
    _mark_superseded(keep)
    return keep


def measure_latencies(runs: list[dict], batch_size: int = 256, repeats: int = 20) -> None:
    """Set ``latency_ms`` (median forward time of one batch of ``batch_size``, eval mode, no
    autograd) and ``latency_batch`` on every finished run that has a model.pt and no
    ``latency_ms`` of its own, measuring all of their models side by side in this process
    (:func:`hashexp.metrics.compare_latency`: the models take turns, so a busy machine slows
    them alike). Runs without a model.pt keep ``latency_ms`` unset."""
    import torch

    from hashexp.metrics import compare_latency
    from hashexp.models import load_model

    by_shape: dict[tuple, dict[str, Any]] = defaultdict(dict)
    for r in runs:
        path = os.path.join(r["run_dir"], "model.pt")
        if r["status"] != "ok" or r.get("latency_ms") is not None or not os.path.isfile(path):
            continue
        try:
            shape = tuple(torch.load(path, map_location="cpu", weights_only=True)["input_shape"])
            by_shape[shape][r["run_dir"]] = load_model(path)
        except Exception as e:  # a damaged model.pt is listed, not fatal
            r["error"] = (r.get("error") or "") + f" latency not measured: {type(e).__name__}: {e}"
    byd = {r["run_dir"]: r for r in runs}
    for shape, models in by_shape.items():
        res = compare_latency(models, shape, batch_size, "forward", repeats=repeats)
        for d, m in res.items():
            byd[d]["latency_ms"] = m["median_ms"]
            byd[d]["latency_batch"] = int(batch_size)


# ---------------------------------------------------------------------------- pairing


def _widths_key(w: Any) -> str:
    return json.dumps(w or {}, sort_keys=True)


def _pair_signature(r: dict, drop_widths: bool = False) -> str | None:
    """Model, data and optimizer settings a vanilla twin must share (None: no .hydra/config.yaml)."""
    c = r["config"]
    if not c:
        return None
    sig = {k: v for k, v in c.items()
           if k.split(".")[0] in ("model", "dataset", "trainer")
           and not _is_noise(k) and not k.startswith(_PAIR_IGNORE)
           and not (drop_widths and k in _WIDTH_KEYS)}
    return json.dumps(sig, sort_keys=True, default=str)


def _is_noise(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in _NOISE_KEYS)


def _ratio(a: Any, b: Any) -> float | None:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    if b <= 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _pair(runs: list[dict]) -> None:
    """Attach each finished run's vanilla twin and the ratios against it.

    A compressed run's twin is the vanilla run (hashing=none) with the same dataset, model,
    initial widths, epochs, seed and world size, and the same model/dataset/trainer config;
    among several, one from the same multirun, then the closest in time. A vanilla run with a
    tag is compared with the widest vanilla run of that tag that differs from it only in the
    widths: the small network trained from scratch against the full one (the widest: itself).
    """
    ok = [r for r in runs if r["status"] == "ok"]
    for r in ok:
        r["_pair_key"] = (r["dataset"], r["model"], _widths_key(r.get("widths_before")), r.get("epochs"),
                          r.get("seed"), r.get("world_size", 1))
        r["_sig"] = _pair_signature(r)
        r["_sig_nw"] = _pair_signature(r, drop_widths=True)
    pool: dict[tuple, list[dict]] = defaultdict(list)
    by_tag: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        if r.get("hashing") == VANILLA:
            pool[r["_pair_key"]].append(r)
            if r.get("tag"):
                by_tag[(r["dataset"], r["model"], r.get("epochs"), r.get("seed"), r.get("world_size", 1),
                        r["tag"])].append(r)
    for r in ok:
        if r.get("hashing") == VANILLA and r.get("tag"):
            cands = [v for v in by_tag[(r["dataset"], r["model"], r.get("epochs"), r.get("seed"),
                                        r.get("world_size", 1), r["tag"])]
                     if r["_sig_nw"] is None or v["_sig_nw"] is None or v["_sig_nw"] == r["_sig_nw"]]
            v = max(cands, key=lambda v: (_num(v.get("flops")), v is r, v["sweep_dir"] == r["sweep_dir"],
                                          -abs(v["_mtime"] - r["_mtime"])))
        else:
            cands = [v for v in pool.get(r["_pair_key"], [])
                     if r["_sig"] is None or v["_sig"] is None or v["_sig"] == r["_sig"]]
            if not cands:
                continue
            v = min(cands, key=lambda v: (v is not r, v["sweep_dir"] is None or v["sweep_dir"] != r["sweep_dir"],
                                          os.path.dirname(v["run_dir"]) != os.path.dirname(r["run_dir"]),
                                          abs(v["_mtime"] - r["_mtime"])))
        r["vanilla_dir"] = v["run_dir"]
        r["flops_reduction"] = _ratio(v.get("flops"), r.get("flops"))
        r["params_reduction"] = _ratio(v.get("params"), r.get("params"))
        r["wall_speedup"] = _ratio(v.get("wall_time_s"), r.get("wall_time_s"))
        r["train_speedup"] = _ratio(v.get("train_time_s"), r.get("train_time_s"))
        r["latency_speedup"] = _ratio(v.get("latency_ms"), r.get("latency_ms"))
        try:
            r["acc_delta"] = float(r["test_acc"]) - float(v["test_acc"])
        except (KeyError, TypeError, ValueError):
            r["acc_delta"] = None


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("-inf")


# ---------------------------------------------------------------------------- grouping


def _label(runs: list[dict]) -> None:
    """method (hashing name, + schedule when several are in play) and variant for every run."""
    schedules = {r.get("schedule") for r in runs if r.get("hashing") != VANILLA}
    for r in runs:
        m = str(r.get("hashing", "?"))
        if len(schedules) > 1 and m != VANILLA:
            m = f"{m}/{r.get('schedule')}"
        r["method"] = m
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        r["variant"] = ""
        if r["status"] == "ok":  # a failed run's partial config must not make variants of the others
            buckets[(r["dataset"], r["model"], r["method"], r.get("tag", ""))].append(r)
    for members in buckets.values():
        keys: set[str] = set()
        for r in members:
            keys |= set(_variant_config(r))
        differing = sorted(k for k in keys
                           if len({_fmt_value(_variant_config(r).get(k, "<unset>")) for r in members}) > 1)
        for r in members:
            vc = _variant_config(r)
            r["variant"] = " ".join(f"{k}={_fmt_value(vc.get(k))}" for k in differing)


def _variant_config(r: dict) -> dict[str, Any]:
    if "_vc" not in r:
        c = {k: v for k, v in r["config"].items() if not _is_noise(k)}
        if r.get("hashing") == VANILLA:  # compressor and schedule settings do nothing without a compressor
            c = {k: v for k, v in c.items() if not k.startswith(("hashing.", "schedule."))}
        if c.get("hashing.width_plan") is not None:
            c["hashing.width_plan"] = "<a run's widths>"  # one path per seed: the same variant
        if not c:  # no .hydra/config.yaml: what metrics.json says about the setup
            c = {"widths": r.get("widths_before"), "epochs": r.get("epochs")}
        r["_vc"] = c
    return r["_vc"]


def _group_key(r: dict) -> tuple:
    return (r["dataset"], r["model"], r["method"], r.get("tag", ""), r.get("variant", ""))


def _mark_superseded(runs: list[dict]) -> None:
    """Several finished runs of one group and seed: the newest counts, the others are superseded."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["status"] == "ok":
            by[(_group_key(r), r.get("seed"))].append(r)
    for members in by.values():
        members.sort(key=lambda r: r["_mtime"])
        for r in members[:-1]:
            r["superseded"] = True


def _stats(values: list[Any]) -> tuple[float | None, float | None]:
    xs = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            xs.append(f)
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _method_order(method: str) -> tuple:
    return (method != VANILLA, method)


def _row_order(key: tuple, flops: float | None) -> tuple:
    """Vanilla first, then methods by name; inside a method and tag, the largest network first."""
    dataset, model, method, tag, variant = key
    return (dataset, model, _method_order(method), tag, -(flops or 0.0), variant)


def summarize(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per (dataset, model, method, tag, variant): mean and std over seeds.

    Each row has dataset, model, method, tag, variant, n (runs), seeds, n_paired (runs with a
    vanilla twin), <metric>_mean and <metric>_std for test_acc, train_acc, majority_acc,
    acc_delta, flops, params, flops_reduction, params_reduction, latency_ms, latency_speedup,
    wall_speedup, train_speedup,
    wall_time_s, train_time_s, hash_time_s, rehashes, peak_rss_mb; widths (final, mean per
    site), widths_before and command (reruns the row as one multirun).
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["status"] == "ok" and not r.get("superseded"):
            groups[_group_key(r)].append(r)
    rows = []
    for key in sorted(groups, key=lambda k: _row_order(k, _stats([r.get("flops") for r in groups[k]])[0])):
        members = sorted(groups[key], key=lambda r: (_num(r.get("seed")), str(r.get("seed")), r["run_dir"]))
        row: dict[str, Any] = dict(zip(("dataset", "model", "method", "tag", "variant"), key))
        row["n"] = len(members)
        row["seeds"] = " ".join(str(r.get("seed")) for r in members)
        row["n_paired"] = sum(1 for r in members if r.get("vanilla_dir"))
        for m in _AGG:
            row[f"{m}_mean"], row[f"{m}_std"] = _stats([r.get(m) for r in members])
        row["widths"] = _mean_widths([r.get("widths") for r in members])
        row["widths_before"] = _mean_widths([r.get("widths_before") for r in members])
        row["command"] = _group_command(members)
        rows.append(row)
    return rows


def _mean_widths(ws: list[Any]) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for w in ws:
        for k, v in (w or {}).items():
            acc[k].append(float(v))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _group_command(members: list[dict]) -> str:
    """The command that reproduces a row: one multirun over its seeds when its runs differ only
    in the seed, else the runs' own commands one after another."""
    if not any(r["overrides"] for r in members):
        return ""
    strip = [[o for o in r["overrides"] if not re.match(r"^[+~]*seed=", o)] for r in members]
    if any(sorted(s) != sorted(strip[0]) for s in strip[1:]):  # e.g. a width plan per seed
        return " ; ".join(r["command"] for r in members)
    seeds = ",".join(str(r.get("seed")) for r in members)
    return "python -m hashexp -m " + " ".join(shlex.quote(o) for o in strip[0] + [f"seed={seeds}"])


# ---------------------------------------------------------------------------- formatting


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
    head = ["dataset", "model", "method"] + (["tag"] if has_tag else []) + (["variant"] if has_var else [])
    has_lat = any(r.get("latency_ms_mean") is not None for r in rows)
    head += ["seeds", "test acc", "majority", "Δacc vs vanilla", "FLOPs", "FLOPs ↓"]
    head += ["latency ms", "latency ↓"] if has_lat else []
    head += ["params ↓", "wall speedup", "train speedup", "hash s", "final widths"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["dataset"], r["model"], f"**{r['method']}**" if r["method"] == VANILLA else r["method"]]
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


def problems_section(runs: Sequence[dict]) -> str:
    """The failed and unfinished runs as a markdown list."""
    bad = [r for r in runs if r["status"] != "ok" or r.get("error")]
    if not bad:
        return "_none_\n"
    lines = []
    for r in sorted(bad, key=lambda r: r["run_dir"]):
        err = (r.get("error") or "").strip().splitlines()
        lines.append(f"- **{r['status']}** `{r['run_dir']}` ({r['dataset']}, {r['model']}, {r['hashing']}, "
                     f"seed {r.get('seed')}): {err[0] if err else ''}")
    return "\n".join(lines) + "\n"


def report_markdown(runs: Sequence[dict], rows: Sequence[dict], plots: Sequence[str] = (),
                    out_dir: str | None = None) -> str:
    ok = [r for r in runs if r["status"] == "ok"]
    n_bad = sum(1 for r in runs if r["status"] != "ok")
    n_sup = sum(1 for r in ok if r.get("superseded"))
    lat = sorted({r["latency_batch"] for r in ok if r.get("latency_batch")})
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
            label = " ".join(x for x in (r["dataset"], r["model"], r["method"], r.get("tag"), r.get("variant")) if x)
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


def write_csv(path: str, records: Sequence[dict], fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = {k: _csv_value(r.get(k)) for k in fields}
            if isinstance(r.get("overrides"), list):
                row["overrides"] = " ".join(r["overrides"])
            w.writerow(row)


def summary_fields(rows: Sequence[dict]) -> list[str]:
    base = ["dataset", "model", "method", "tag", "variant", "n", "seeds", "n_paired"]
    stats = [f"{m}_{s}" for m in _AGG for s in ("mean", "std")]
    return base + stats + ["widths", "widths_before", "command"]


# ---------------------------------------------------------------------------- plots

_METHOD_COLORS = {"simhash": "tab:blue", "mips": "tab:purple", "magnitude": "tab:green", "random": "tab:red",
                  "scratch": "tab:brown"}
_EXTRA_COLORS = ["tab:orange", "tab:cyan", "tab:olive", "tab:pink", "tab:gray"]
_LINESTYLES = ["-", "--", ":", "-."]


def _method_color(method: str, cache: dict[str, str]) -> str:
    if method == VANILLA:
        return "black"
    base = method.split("/")[0]
    if base in _METHOD_COLORS:
        return _METHOD_COLORS[base]
    if method not in cache:
        cache[method] = _EXTRA_COLORS[len(cache) % len(_EXTRA_COLORS)]
    return cache[method]


def _shade(color: str, i: int, n: int):
    """Variant i of n of one method: the method's colour, from darker to lighter."""
    from matplotlib.colors import to_rgb

    c = to_rgb(color)
    if n <= 1:
        return c
    lo = 0.0 if max(c) < 0.2 else -0.35  # black cannot get darker: spread it over greys
    t = lo + (0.65 - lo) * i / (n - 1)  # <0 darker, >0 lighter
    if t < 0:
        return tuple(x * (1 + t) for x in c)
    return tuple(x + (1 - x) * t for x in c)


def _group_label(key: tuple, show_tag: bool) -> str:
    _, _, method, tag, variant = key
    label = "vanilla" if method == VANILLA else method
    if show_tag and tag:
        label += f" [{tag}]"
    if variant:
        label += f" {variant}"
    return label


def read_history(run_dir: str) -> list[dict[str, Any]]:
    """history.csv as a list of dicts with floats (empty cells dropped); [] if absent."""
    path = os.path.join(run_dir, "history.csv")
    rows = []
    try:
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row: dict[str, Any] = {"kind": raw.get("kind", "")}
                for k, v in raw.items():
                    if k == "kind" or v in (None, ""):
                        continue
                    try:
                        row[k] = float(v)
                    except ValueError:
                        pass
                if "step" in row:
                    rows.append(row)
    except OSError:
        return []
    rows.sort(key=lambda r: (r["step"], r["kind"] == "epoch"))
    return rows


def _mean_curve(histories: list[list[dict]], col: str, kinds: tuple[str, ...] = ("step",)) -> tuple[list, list]:
    """Mean over seeds of one history column, per step (steps where any seed has a value)."""
    by_step: dict[float, list[float]] = defaultdict(list)
    order: list[float] = []
    for h in histories:
        seen: set[float] = set()
        for row in h:
            if row["kind"] in kinds and col in row and math.isfinite(row[col]):
                s = row["step"]
                if s in seen and row["kind"] == "epoch":  # same step as a step row: keep the post-rehash value
                    by_step[s][-1] = row[col]
                    continue
                seen.add(s)
                if s not in by_step:
                    order.append(s)
                by_step[s].append(row[col])
    xs = sorted(order)
    return xs, [statistics.fmean(by_step[s]) for s in xs]


def make_plots(runs: Sequence[dict], out_dir: str) -> list[str]:
    """PNG plots per (dataset, model) into ``out_dir``; returns their paths.

    acc_flops_<dataset>_<model>.png: test accuracy vs FLOPs (log x), one point per group with
    std error bars over seeds, the variants of one method joined into a trade-off curve, the
    majority-class accuracy as a dotted line. curves_<dataset>_<model>.png: training loss, width
    per site, time per step and weight norm per layer over steps, mean over seeds, hashed and
    vanilla on the same axes (colour per method, shade per variant, line style per site/layer).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in runs if r["status"] == "ok" and not r.get("superseded")]
    by_pair: dict[tuple, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        by_pair[(r["dataset"], r["model"])][_group_key(r)].append(r)
    paths = []
    extra: dict[str, str] = {}
    for (ds, model), groups in sorted(by_pair.items()):
        keys = sorted(groups, key=lambda k: _row_order(k, _stats([r.get("flops") for r in groups[k]])[0]))
        show_tag = len({k[3] for k in keys}) > 1
        per_method: dict[str, list[tuple]] = defaultdict(list)
        for k in keys:
            per_method[k[2]].append(k)
        colors = {}
        for m, ks in per_method.items():
            for i, k in enumerate(ks):
                colors[k] = _shade(_method_color(m, extra), i, len(ks))
        stem = _safe(f"{ds}_{model}")
        paths.append(_plot_acc_flops(plt, groups, keys, per_method, colors, show_tag, ds, model,
                                     os.path.join(out_dir, f"acc_flops_{stem}.png"), extra))
        p = _plot_curves(plt, groups, keys, colors, show_tag, ds, model, os.path.join(out_dir, f"curves_{stem}.png"))
        if p:
            paths.append(p)
    return paths


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s)


def _plot_acc_flops(plt, groups, keys, per_method, colors, show_tag, ds, model, path, extra) -> str:
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    majority = []
    # a marker per method: methods that land on the same point stay distinguishable
    markers = {m: "*" if m == VANILLA else "osD^vP"[i % 6] for i, m in enumerate(per_method)}
    for m, ks in per_method.items():
        curves: dict[str, list[tuple[float, float]]] = defaultdict(list)  # per tag: its variants' trade-off
        for k in ks:
            rs = groups[k]
            fm, fs = _stats([r.get("flops") for r in rs])
            am, as_ = _stats([r.get("test_acc") for r in rs])
            majority += [r.get("majority_acc") for r in rs]
            if fm is None or am is None:
                continue
            curves[k[3]].append((fm, am))
            ax.errorbar(fm, am, xerr=fs or 0, yerr=as_ or 0, fmt=markers[m], ms=13 if m == VANILLA else 8,
                        color=colors[k], capsize=3, label=_group_label(k, show_tag), zorder=3, alpha=0.85)
        for pts in curves.values():
            if len({p[0] for p in pts}) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", lw=1, color=_method_color(m, extra),
                        alpha=0.6, zorder=2)
    mj, _ = _stats(majority)
    if mj is not None:
        ax.axhline(mj, color="gray", ls=":", lw=1.5, label=f"majority class ({mj:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per sample (final network, log scale)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(f"{ds} / {model}: accuracy vs FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_curves(plt, groups, keys, colors, show_tag, ds, model, path) -> str | None:
    hist = {k: [h for h in (read_history(r["run_dir"]) for r in groups[k]) if h] for k in keys}
    if not any(hist.values()):
        return None
    cols = set()
    for hs in hist.values():
        for h in hs:
            for row in h:
                cols |= set(row)
    sites = sorted(c for c in cols if c.startswith("width/"))
    layers = sorted(c for c in cols if c.startswith("wnorm/"))
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    ax_loss, ax_width, ax_time, ax_norm = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    tops = []
    for i, k in enumerate(keys):
        hs = hist[k]
        if not hs:
            continue
        c, label = colors[k], _group_label(k, show_tag)
        # earlier groups drawn wider, so a group whose curve lies on top of another's leaves it visible
        lw = max(3.2 - 0.5 * i, 1.0)
        x, y = _mean_curve(hs, "loss")
        ax_loss.plot(x, y, color=c, label=label, lw=lw)
        x, y = _mean_curve(hs, "step_time_s")
        if y:
            ax_time.plot(x, [v * 1e3 for v in y], color=c, label=label, lw=1)
            tops.append(sorted(y)[int(0.95 * (len(y) - 1))] * 1e3)
        if len(sites) <= 6:
            for j, s in enumerate(sites):
                x, y = _mean_curve(hs, s, ("step", "epoch"))
                ax_width.plot(x, y, color=c, ls=_LINESTYLES[j % 4], drawstyle="steps-post", lw=lw,
                              label=label if j == 0 else None)
        else:
            x, y = _total_curve(hs, sites)
            ax_width.plot(x, y, color=c, drawstyle="steps-post", label=label, lw=lw)
        if len(layers) <= 6:
            for j, lyr in enumerate(layers):
                x, y = _mean_curve(hs, lyr)
                ax_norm.plot(x, y, color=c, ls=_LINESTYLES[j % 4], lw=lw, label=label if j == 0 else None)
        else:
            x, y = _total_curve(hs, layers, squared=True)
            ax_norm.plot(x, y, color=c, label=label, lw=lw)
    ax_loss.set_title("training loss")
    ax_loss.set_yscale("log")
    ax_width.set_title("width per site" if len(sites) <= 6 else f"total width over {len(sites)} sites")
    ax_time.set_title("time per step (ms)")
    if tops:
        ax_time.set_ylim(0, 1.5 * max(tops))
    ax_norm.set_title("weight norm per layer" if len(layers) <= 6 else f"weight norm, all {len(layers)} layers")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    for ax, names, prefix in ((ax_width, sites, "width/"), (ax_norm, layers, "wnorm/")):
        if 1 < len(names) <= 6:  # second legend: which line style is which site/layer
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], color="gray", ls=_LINESTYLES[j % 4], label=n[len(prefix):])
                       for j, n in enumerate(names)]
            leg = ax.legend(handles=handles, fontsize=8, loc="best", title=prefix.rstrip("/"))
            ax.add_artist(leg)
    fig.suptitle(f"{ds} / {model}: training curves (mean over seeds)")
    handles, labels = ax_loss.get_legend_handles_labels()
    ncol = min(3, max(1, len(labels)))
    rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, min(0.04 + 0.028 * rows, 0.4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _total_curve(histories, cols, squared=False):
    """Sum over columns (root of sum of squares for norms), mean over seeds, per step."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for h in histories:
        last: dict[float, float] = {}
        for row in h:
            vals = [row[c] for c in cols if c in row]
            if not vals:
                continue
            last[row["step"]] = math.sqrt(sum(v * v for v in vals)) if squared else sum(vals)
        for s, v in last.items():
            by_step[s].append(v)
    xs = sorted(by_step)
    return xs, [statistics.fmean(by_step[s]) for s in xs]


# ---------------------------------------------------------------------------- CLI


def write_results(runs: Sequence[dict], out_dir: str, plots: bool = True) -> dict[str, Any]:
    """results.md, results.csv, runs.csv and (unless plots=False) the PNGs into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(runs)
    pngs = make_plots(runs, out_dir) if plots else []
    md = report_markdown(runs, rows, pngs, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    write_csv(os.path.join(out_dir, "results.csv"), rows, summary_fields(rows))
    write_csv(os.path.join(out_dir, "runs.csv"), sorted(runs, key=lambda r: r["run_dir"]), RUN_FIELDS)
    return {"rows": rows, "markdown": md, "plots": pngs,
            "files": [os.path.join(out_dir, n) for n in ("results.md", "results.csv", "runs.csv")] + pngs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hashexp.results",
                                description="Tables and plots from hashexp run dirs: each run next to its vanilla twin.")
    p.add_argument("paths", nargs="*", help="dirs to scan recursively (default: $HASHEXP_OUTPUTS or outputs)")
    p.add_argument("--sweep", help="only this multirun dir ('latest': the newest under the paths)")
    p.add_argument("--since", help="only runs started on or after YYYY-MM-DD")
    p.add_argument("--until", help="only runs started on or before YYYY-MM-DD")
    p.add_argument("--out", help="where results.md/.csv, runs.csv and plots go (default: <first path>/results)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--latency", type=int, nargs="?", const=256, metavar="BATCH",
                   help="measure each run's forward latency from its model.pt at this batch size (default 256), "
                        "all models side by side, and add latency columns")
    a = p.parse_args(argv)
    default_root = os.environ.get("HASHEXP_OUTPUTS", "outputs")
    paths = a.paths or [default_root]
    if not a.paths and a.sweep and a.sweep != "latest" and not os.path.isdir(default_root):
        paths = []  # a sweep dir alone: its vanilla runs are the only twins
    for path in paths:
        if not os.path.isdir(path):
            print(f"hashexp.results: error: {path} is not a directory; pass the outputs dir "
                  f"(e.g. python -m hashexp.results outputs)", file=sys.stderr)
            return 2
    try:
        if a.latency is not None and a.latency < 1:
            raise ValueError(f"--latency must be a batch size >= 1, got {a.latency}")
        runs = collect_runs(paths, sweep=a.sweep, since=a.since, until=a.until, latency_batch=a.latency)
    except (FileNotFoundError, ValueError) as e:
        print(f"hashexp.results: error: {e}", file=sys.stderr)
        return 2
    if not runs:
        where = a.sweep or ", ".join(paths)
        print(f"hashexp.results: no run directories (with .hydra/, metrics.json or status.json) under {where}"
              + (" in that date range" if a.since or a.until else ""), file=sys.stderr)
        return 1
    out = a.out or os.path.join(paths[0] if paths else a.sweep, "results")
    res = write_results(runs, out, plots=not a.no_plots)
    print(markdown_table(res["rows"]))
    bad = [r for r in runs if r["status"] != "ok" or r.get("error")]
    if bad:
        print("Failed / unfinished:\n" + problems_section(runs))
    print(f"wrote results.md, results.csv, runs.csv and {len(res['plots'])} plots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
