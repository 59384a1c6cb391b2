"""Run dirs on disk -> :class:`RunRecord`: discovery, loading and the readers of a run's files.

A run dir is any directory holding .hydra/, metrics.json or status.json. :func:`load_run` reads
one into a record (ok: metrics.json; failed: status.json or an unreadable metrics.json;
unfinished: only .hydra/ and perhaps history.csv). :func:`read_metrics` and :func:`read_history`
are the readers of metrics.json and history.csv that benchmarks use too. Loading sits below
pairing and summarizing: this module imports neither (:mod:`hashexp.results.collect` finds,
loads, pairs, labels and filters all runs).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from hashexp.results.vocab import SKIP_DIRS, VANILLA, is_noise
from hashexp.utils.dicts import flatten

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DATE_RE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)([_T ](\d{2})-(\d{2})-(\d{2}))?")
_TIME_RE = re.compile(r"^(\d{2})-(\d{2})-(\d{2})")


@dataclass(eq=False)
class RunRecord:
    """One run dir, as read from disk and then paired with its vanilla twin.

    The named fields are what hashexp.results itself needs; ``metrics`` holds metrics.json as
    written (test_acc, flops, widths, ...). For the transition from plain dicts, a record reads
    like one: ``r["key"]`` / ``r.get("key")`` / ``"key" in r`` look up a field of that name first,
    then ``metrics`` (``r["run_dir"]``, ``r["test_acc"]``, ``r.get("vanilla_dir")``).
    """

    run_dir: str
    sweep_dir: str | None = None  # the multirun dir (holding multirun.yaml) it belongs to
    status: str = "unfinished"  # ok, failed or unfinished
    error: str = ""  # why it failed, how far it got, or a warning on a finished run
    date: dt.datetime | None = None  # start time from the Hydra dir names, else the dir's mtime
    mtime: float = 0.0  # of metrics.json (else of the run dir): which repeat is the newest
    config: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml, flattened (a.b.c keys)
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    command: str = ""  # the `python -m hashexp ...` that reruns it
    groups: dict[str, str] = field(default_factory=dict)  # config group choices
    dataset: str = "?"
    model: str = "?"
    hashing: str = "?"
    schedule: str = "?"
    tag: str = ""
    seed: Any = None
    epochs: Any = None
    world_size: Any = 1
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json ({} unless ok)
    variant_config: dict[str, Any] = field(default_factory=dict)  # the config keys variants are named by
    latency_ms: float | None = None  # from metrics.json or measured by measure_latencies
    latency_batch: int | None = None
    # set by collect.collect_runs (summary.label, summary.mark_superseded)
    hashing_label: str = ""  # the hashing name in tables: `hashing` (vanilla: none), + /schedule when several schedules are in play
    variant: str = ""  # the differing config keys inside its hashing, e.g. "hashing.threshold=0.8"
    superseded: bool = False  # a newer finished run of the same group and seed exists
    # set by pairing.pair on finished runs
    pair_key: tuple | None = None  # dataset, model, initial widths, epochs, seed, world size
    pair_signature: str | None = None  # model/dataset/trainer config a twin must share (None: no config)
    pair_signature_no_widths: str | None = None  # the same without the width keys (tagged runs)
    vanilla_dir: str | None = None
    flops_reduction: float | None = None  # vanilla / run
    params_reduction: float | None = None
    wall_speedup: float | None = None  # vanilla time / run time
    train_speedup: float | None = None
    latency_speedup: float | None = None
    acc_delta: float | None = None  # run test_acc - vanilla test_acc (a fraction, not pp)

    # the dict view, for callers written against the dict records
    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            return getattr(self, key)
        return self.metrics[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A field, else a metrics.json key, else ``default``."""
        if key in _FIELDS:
            return getattr(self, key)
        return self.metrics.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in _FIELDS or key in self.metrics


_FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))


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
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
    return sorted(found)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """metrics.json of a run dir. Raises OSError when it is missing, ValueError when it is not a
    JSON object."""
    m = _read_json(os.path.join(run_dir, "metrics.json"))
    if not isinstance(m, dict):
        raise ValueError("not a JSON object")
    return m


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """history.csv as a list of dicts: ``kind`` (step, epoch, drift, ...) and every numeric cell as
    a float (empty and text cells dropped); rows without a step are dropped; sorted by step, an
    epoch row after the step row of its step. [] if there is no history.csv."""
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


def _read_yaml(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError):
        return None


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
    if not os.path.isfile(os.path.join(run_dir, "history.csv")):
        return "no history.csv"
    done = [r["epoch"] for r in read_history(run_dir) if r["kind"] == "epoch" and "epoch" in r]
    if not done:
        return "no epoch finished"
    last = int(done[-1]) if done[-1].is_integer() else done[-1]
    return f"epoch {last}/{epochs if epochs is not None else '?'}"


def _hydra_choices(hydra_dir: str) -> dict[str, str]:
    """Group choices from .hydra/hydra.yaml (runtime.choices), without Hydra's own groups."""
    h = _read_yaml(os.path.join(hydra_dir, "hydra.yaml"))
    try:
        return {k: str(v) for k, v in h["hydra"]["runtime"]["choices"].items() if not k.startswith("hydra")}
    except (KeyError, TypeError, AttributeError):
        return {}


def variant_config(r: RunRecord) -> dict[str, Any]:
    """The config keys a run's variant is named by: its config without noise keys (and, for a
    vanilla run, without compressor and schedule settings, which do nothing there)."""
    c = {k: v for k, v in r.config.items() if not is_noise(k)}
    if r.hashing == VANILLA:
        c = {k: v for k, v in c.items() if not k.startswith(("hashing.", "schedule."))}
    if c.get("hashing.width_plan") is not None:
        c["hashing.width_plan"] = "<a run's widths>"  # one path per seed: the same variant
    if not c:  # no .hydra/config.yaml: what metrics.json says about the setup
        c = {"widths": r.get("widths_before"), "epochs": r.epochs}
    return c


def load_run(run_dir: str) -> RunRecord:
    """One run dir as a :class:`RunRecord`: its metrics.json joined with its group choices and
    overrides (setup fields come from metrics.json first, then .hydra/config.yaml)."""
    hyd = os.path.join(run_dir, ".hydra")
    cfg = _read_yaml(os.path.join(hyd, "config.yaml"))
    cfg = cfg if isinstance(cfg, dict) else {}
    overrides = _read_yaml(os.path.join(hyd, "overrides.yaml"))
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    r = RunRecord(run_dir=run_dir, sweep_dir=_sweep_dir(run_dir), overrides=overrides, config=flatten(cfg))
    metrics_path = os.path.join(run_dir, "metrics.json")
    status_path = os.path.join(run_dir, "status.json")
    metrics = None
    if os.path.isfile(metrics_path):
        try:
            metrics = read_metrics(run_dir)
        except (OSError, ValueError) as e:
            r.status, r.error = "failed", f"metrics.json unreadable ({e})"
    status = None
    if os.path.isfile(status_path):
        try:
            status = _read_json(status_path)
        except (OSError, ValueError) as e:
            status = {"status": "failed", "error": f"status.json unreadable ({e})"}
    choices: dict[str, str] = {}
    if metrics is not None:
        r.metrics = metrics
        r.status = "ok" if metrics.get("status", "ok") == "ok" else str(metrics.get("status"))
        if status is not None and os.path.getmtime(status_path) > os.path.getmtime(metrics_path):
            r.error = f"a later attempt failed: {status.get('error', '')} (its earlier metrics.json is used)"
        r.mtime = os.path.getmtime(metrics_path)
    elif status is not None:
        r.status = "failed"
        r.error = str(status.get("error", "unknown error"))
        choices = status.get("groups") or {}
    elif r.status != "failed":
        r.error = _progress(run_dir, r.config.get("trainer.epochs"))
    if metrics is None:
        r.mtime = os.path.getmtime(run_dir)
    m = r.metrics
    r.groups = m.get("groups") or choices or _hydra_choices(hyd)
    c = r.config
    for key in ("dataset", "model", "hashing", "schedule"):
        setattr(r, key, m.get(key) or c.get(f"{key}.name") or r.groups.get(key) or "?")
    r.seed = m["seed"] if m.get("seed") is not None else c.get("seed")
    r.tag = m["tag"] if m.get("tag") is not None else (c.get("tag") or "")
    r.epochs = m["epochs"] if m.get("epochs") is not None else c.get("trainer.epochs")
    r.world_size = m.get("world_size", 1)
    r.latency_ms, r.latency_batch = m.get("latency_ms"), m.get("latency_batch")
    r.date = _run_date(run_dir)
    r.command = "python -m hashexp " + " ".join(shlex.quote(o) for o in overrides)
    r.variant_config = variant_config(r)
    return r


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
                subdirs[:] = [s for s in subdirs if s not in SKIP_DIRS]
    return best


def measure_latencies(runs: list[RunRecord], batch_size: int = 256, repeats: int = 20) -> None:
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
        path = os.path.join(r.run_dir, "model.pt")
        if r.status != "ok" or r.latency_ms is not None or not os.path.isfile(path):
            continue
        try:
            shape = tuple(torch.load(path, map_location="cpu", weights_only=True)["input_shape"])
            by_shape[shape][r.run_dir] = load_model(path)
        except Exception as e:  # a damaged model.pt is listed, not fatal
            r.error = (r.error or "") + f" latency not measured: {type(e).__name__}: {e}"
    byd = {r.run_dir: r for r in runs}
    for shape, models in by_shape.items():
        res = compare_latency(models, shape, batch_size, "forward", repeats=repeats)
        for d, m in res.items():
            byd[d].latency_ms = m["median_ms"]
            byd[d].latency_batch = int(batch_size)
