"""Where a rehash's time goes: one `python -m hashexp` run with timers around each phase.

    nice -n 10 .venv/bin/python benchmarks/profile_rehash.py --json /tmp/prof.json -- experiment=fmnist_mlp2048 \
        hashing=simhash seed=0 trainer.num_threads=1

Runs the app (of this checkout, or of ``--root``) in this process with every phase of :meth:`hashexp.merge.rehasher.Rehasher.rehash`
wrapped by a timer (no change to what runs) and writes the split to ``--json``:

- ``calib``: the calibration forwards that measure a site before its merge (capture_sites);
- ``refit_pass``: the forward that refits the consumers in order (and measures the next site),
  minus the least-squares solves;
- ``lsq``: the least-squares solves (lsq_map) and the consumer rewrite (refit_consumer);
- ``candidates``: LSH candidates (HashCompressor.eligible);
- ``order``: the error-ordered removal (HashCompressor._order);
- ``surgery``: producers and optimizer state (apply_producers);
- ``bn``: BatchNorm re-estimation;
- ``total``: Rehasher.rehash as a whole (``other`` = total minus the phases: plans, reports, DDP);
- ``capture``: the training-forward row recording of ``hashing.calibration=training``
  (:class:`hashexp.merge.training_rows.TrainingCapture`, while training, outside a rehash), when it exists.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOTALS: dict[str, float] = {}
_stack: list[str] = []


def _timed(name: str, fn):
    """``fn`` wrapped: its time goes to ``name`` (and is taken out of an enclosing timed phase)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        _stack.append(name)
        try:
            return fn(*a, **kw)
        finally:
            _stack.pop()
            dt = time.perf_counter() - t0
            TOTALS[name] = TOTALS.get(name, 0.0) + dt
            if _stack and _stack[-1] != "total":  # nested: the outer phase does not count it twice
                TOTALS[_stack[-1]] = TOTALS.get(_stack[-1], 0.0) - dt
    return wrapper


def install() -> None:
    """Wrap the phases (module attributes the callers look up at call time)."""
    from hashexp.merge import calibration as cal, compressor, hashed, rehasher

    if hasattr(cal, "capture_sites"):
        cap = cal.capture_sites

        def capture(model, specs, x, *a, **kw):
            name = "refit_pass" if any(s[2] is not None for s in specs) else "calib"
            return _timed(name, cap)(model, specs, x, *a, **kw)

        cal.capture_sites = capture
    else:  # a checkout from before one pass per site
        cap1 = cal.capture_site

        def capture1(model, site, x, seed=0, before_consumer=None, *a, **kw):
            name = "refit_pass" if before_consumer is not None else "calib"
            return _timed(name, cap1)(model, site, x, seed, before_consumer, *a, **kw)

        cal.capture_site = capture1
    cal.lsq_map = _timed("lsq", cal.lsq_map)
    compressor.refit_consumer = _timed("lsq", compressor.refit_consumer)
    try:  # the refit on recorded rows (hashing.calibration=training)
        from hashexp.merge import training_rows

        training_rows.refit_consumer = _timed("lsq", training_rows.refit_consumer)
    except ImportError:  # a checkout from before training-row calibration
        pass
    compressor.apply_producers = _timed("surgery", compressor.apply_producers)
    hashed.HashCompressor.eligible = _timed("candidates", hashed.HashCompressor.eligible)
    hashed.HashCompressor._order = _timed("order", hashed.HashCompressor._order)
    rehasher.recalibrate_bn = _timed("bn", rehasher.recalibrate_bn)
    rehasher.Rehasher.rehash = _timed("total", rehasher.Rehasher.rehash)
    cap_cls = getattr(rehasher, "TrainingCapture", None)  # hashexp.merge.training_rows
    if cap_cls is not None and hasattr(cap_cls, "record"):
        cap_cls.record = _timed("capture", cap_cls.record)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose hashexp runs (default: this one)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    sys.path.insert(0, str(a.root.resolve()))
    install()
    from hashexp.__main__ import main as app_main

    sys.argv = ["hashexp", *a.overrides]
    try:
        app_main()
    finally:
        phases = ("calib", "refit_pass", "lsq", "candidates", "order", "surgery", "bn")
        out = {k: round(TOTALS.get(k, 0.0), 3) for k in (*phases, "capture", "total")}
        out["other"] = round(out["total"] - sum(out[k] for k in phases), 3)
        a.json.write_text(json.dumps(out, indent=1))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
