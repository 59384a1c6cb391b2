"""The one harness every benchmark uses: app runs, interleaved repeated timing, seeds, markdown.

- :func:`run`: one ``python -m hashexp`` run into a directory (reused when it finished).
- :func:`interleave`: time several contenders side by side: ``repeats`` rounds, each running every
  contender once in a rotated order (so drift in machine load hits all of them alike), after
  ``warmup`` untimed rounds; :class:`Timing` gives median, min and max, :meth:`Timings.ratio` the
  per-round ratio of two contenders. The 1-minute load average is read at start and end.
- :func:`seeds`: the seeds of ``n`` repeats of an experiment, the same everywhere;
  :func:`trained_mlp_layers`: real trained layers (seeded) for the LSH benchmarks.
- :class:`PeakRSS`: peak memory of a phase (RSS sampled by a thread).
- :func:`write_markdown`: a result file that starts with the command that reproduces it and the
  machine it ran on.

A wall-time *ratio* is printed only from :meth:`Timings.ratio` (contenders measured side by side
in one process); times of separate runs are not divided by each other.
"""

from __future__ import annotations

import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # hashexp from this checkout

from hashexp.results import read_history, read_metrics  # noqa: E402  (re-exported for the scripts)

__all__ = ["PY", "ROOT", "PeakRSS", "Timing", "Timings", "command_line", "fmt", "interleave", "load_average", "machine_line",
           "mean_std", "read_history", "read_metrics", "rss_bytes", "run", "seeds", "trained_mlp_layers", "write_markdown"]


# ------------------------------------------------------------------------------ app runs
def run(overrides: list[str], run_dir: Path) -> dict:
    """One `python -m hashexp` run into ``run_dir``; reused when its metrics.json exists (a rerun resumes)."""
    if (run_dir / "metrics.json").exists():
        return read_metrics(run_dir)
    cmd = [PY, "-m", "hashexp", *overrides, f"hydra.run.dir={run_dir}", "trainer.logging.progress=log",
           "trainer.checkpoint.enabled=false"]
    print("+", " ".join(shlex.quote(c) for c in cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    m = read_metrics(run_dir)
    print(f"  test_acc {m['test_acc']:.4f} flops {m['flops']:,} widths {m['widths']} wall {m['wall_time_s']:.1f}s "
          f"(process {time.perf_counter() - t0:.1f}s)", flush=True)
    return m


def trained_mlp_layers(widths: tuple[int, int] = (2048, 2048), steps: int = 100, seed: int = 0) -> dict:
    """[w; b] rows (torch tensors) of both hidden layers of an MLP 784-w1-w2-10 after ``steps`` Adam
    steps on Fashion-MNIST (batch 256, lr 1e-3): real trained layers for the LSH benchmarks."""
    import torch
    from omegaconf import OmegaConf

    from hashexp.data import build_dataset

    data = build_dataset(OmegaConf.load(ROOT / "conf" / "dataset" / "fashion_mnist.yaml"), seed=seed)
    xtr, ytr = data.x_train.reshape(len(data.x_train), -1).float(), data.y_train.long()
    torch.manual_seed(seed)
    w1, w2 = widths
    net = torch.nn.Sequential(torch.nn.Linear(784, w1), torch.nn.ReLU(), torch.nn.Linear(w1, w2),
                              torch.nn.ReLU(), torch.nn.Linear(w2, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (256,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: torch.cat([m.weight, m.bias[:, None]], 1).detach().contiguous() for n, m in (("fc1", net[0]), ("fc2", net[2]))}


def seeds(n: int, first: int = 0) -> list[int]:
    """The seeds of ``n`` repeats: ``first, first + 1, ...`` (every benchmark pairs runs by these)."""
    if n < 1:
        raise SystemExit(f"need at least one seed, got {n}")
    return list(range(first, first + n))


# ------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Seconds of one contender over the timed rounds."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def fmt(self, scale: float = 1.0, digits: int = 3) -> str:
        """'median (min–max)' in seconds times ``scale`` (1000: milliseconds)."""
        return f"{self.median * scale:.{digits}f} ({self.min * scale:.{digits}f}–{self.max * scale:.{digits}f})"


@dataclass
class Timings:
    """The result of :func:`interleave`: one :class:`Timing` per contender, the load around it."""

    timings: dict[str, Timing]
    load_start: float
    load_end: float
    rounds: int

    def __getitem__(self, name: str) -> Timing:
        return self.timings[name]

    def ratio(self, num: str, den: str) -> Timing:
        """Per-round ratio ``num / den`` (side by side: both timed in the same round)."""
        a, b = self.timings[num].times, self.timings[den].times
        return Timing(f"{num}/{den}", [x / y for x, y in zip(a, b)])

    def load_note(self) -> str:
        return f"load average (1 min) at start / end {self.load_start:.1f} / {self.load_end:.1f}"


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def interleave(contenders: dict[str, Callable[[int], float | None]], repeats: int = 5,
               warmup: int = 1) -> Timings:
    """Time every contender once per round, ``repeats`` rounds, the order rotated each round.

    A contender is ``fn(round) -> seconds``; when it returns None the harness times the call
    itself. ``warmup`` rounds run first and are not recorded (allocator, kernels, caches).
    """
    if repeats < 1:
        raise SystemExit(f"need at least one timed round, got {repeats}")
    names = list(contenders)
    load0 = load_average()
    out = {n: Timing(n) for n in names}
    for r in range(-warmup, repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            dt = contenders[n](r)
            dt = time.perf_counter() - t0 if dt is None else dt
            if r >= 0:
                out[n].times.append(float(dt))
    return Timings(out, load0, load_average(), repeats)


# ------------------------------------------------------------------------------ memory
def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.delta``: peak RSS above the RSS at entry, in bytes.

    Sampled every 2 ms by a thread: torch and C extensions allocate outside Python's heap, where
    tracemalloc does not see."""

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, rss_bytes())
        self._stop.set()
        self._t.join()
        self.delta = self.peak - self.base


# ------------------------------------------------------------------------------ formatting
def mean_std(xs) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if len(xs) == 1:
        return xs[0], 0.0
    return statistics.mean(xs), statistics.stdev(xs)


def fmt(xs, pct: bool = False, digits: int = 2) -> str:
    """'mean ± sd' of ``xs`` (as percentages with ``pct``)."""
    m, s = mean_std(xs)
    if pct:
        return f"{100 * m:.2f} ± {100 * s:.2f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def command_line(argv: Sequence[str] | None = None, prefix: str = ".venv/bin/python") -> str:
    """The command that reproduces this benchmark: ``prefix benchmarks/<script> <args>``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([prefix, str(script), *(shlex.quote(a) for a in argv[1:])])


def machine_line() -> str:
    """Machine, cores, threads and library versions, for the top of a result file."""
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def write_markdown(path: str | os.PathLike, title: str, body: Sequence[str], command: str | None = None,
                   notes: Sequence[str] = ()) -> str:
    """Write ``# title``, the command, the machine line, ``notes`` and ``body`` to ``path``; the text."""
    lines = [f"# {title}", "", f"Command: `{command or command_line()}`", "", f"Machine: {machine_line()}.",
             *([""] + list(notes) if notes else []), "", *body]
    text = "\n".join(lines).rstrip("\n") + "\n"
    Path(path).write_text(text)
    return text
