"""Runs -> PNG figures, three per (dataset, model), each method in one colour in all of them.

- ``acc_flops_<dataset>_<model>.png``: accuracy change against the vanilla twin (pp, mean ± std
  over seeds) vs FLOPs reduction (vanilla / run, log x), one legend entry per method: its
  variants are the points of one trade-off curve. The vanilla and majority-class accuracies are
  named in the title, so the pp axis reads as accuracy.
- ``curves_<dataset>_<model>.png``: training loss, width per site, time per step and test
  accuracy over training, mean over seeds.
- ``regularization_<dataset>_<model>.png``: train − test accuracy gap per epoch (pp), weight norm
  and gradient norm per layer over training (history.csv ``wnorm/<layer>``, ``gnorm/<layer>``):
  hashed against vanilla, is the merged network the more regular one?

:func:`plot_figures` builds the figures (matplotlib ``Figure`` objects, no pyplot state), so
tests can read their axes; :func:`make_plots` writes them.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hashexp.results.runs import read_history
from hashexp.results.summary import finished_groups
from hashexp.results.vocab import VANILLA, contender_colors, stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hashexp.results.runs import RunRecord

_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = "osD^vP"
_MAX_LINES = 6  # more sites/layers than this: one total curve instead of a line each


def contender(key: tuple) -> tuple[str, str]:
    """(method, tag) of a group key: what gets one colour and one legend entry; its variants
    (widths, thresholds, ...) are points of one curve."""
    return key[2], key[3]


def _color_name(c: tuple[str, str]) -> str:
    method, tag = c
    return tag if method == VANILLA and tag else method  # the small-from-scratch runs: "scratch"


def _label(c: tuple[str, str], show_tag: bool) -> str:
    method, tag = c
    name = "vanilla" if method == VANILLA else method
    return f"{name} [{tag}]" if show_tag and tag else name


def _shade(color: str, i: int, n: int) -> tuple[float, float, float]:
    """Variant i of n of one method: the method's own colour first (the one in the legend), the
    others lighter."""
    from matplotlib.colors import to_rgb

    c = to_rgb(color)
    t = 0.65 * i / (n - 1) if n > 1 else 0.0
    return tuple(x + (1 - x) * t for x in c)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s)


def plot_figures(runs: Sequence[RunRecord]) -> dict[str, Figure]:
    """The figures of :func:`make_plots`, by file name, not saved."""
    groups_all = finished_groups(runs)
    colors = contender_colors([_color_name(contender(k)) for k in groups_all])
    by_pair: dict[tuple, dict[tuple, list]] = defaultdict(dict)
    for k, rs in groups_all.items():
        by_pair[(k[0], k[1])][k] = rs
    figs: dict[str, Figure] = {}
    for (ds, model), groups in sorted(by_pair.items()):
        per: dict[tuple, list[tuple]] = defaultdict(list)  # contender -> its group keys, table order
        for k in groups:
            per[contender(k)].append(k)
        show_tag = len({k[3] for k in groups}) > 1
        style = _Style({c: colors[_color_name(c)] for c in per}, per, show_tag)
        stem = _safe(f"{ds}_{model}")
        figs[f"acc_flops_{stem}.png"] = _acc_flops_figure(groups, style, ds, model)
        hist = {k: [h for h in (read_history(r.run_dir) for r in rs) if h] for k, rs in groups.items()}
        if any(hist.values()):
            figs[f"curves_{stem}.png"] = _curves_figure(hist, style, ds, model)
            reg = _regularization_figure(hist, style, ds, model)
            if reg is not None:
                figs[f"regularization_{stem}.png"] = reg
    return figs


def make_plots(runs: Sequence[RunRecord], out_dir: str) -> list[str]:
    """Write the PNGs of :func:`plot_figures` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in plot_figures(runs).items():
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110 if name.startswith("acc_flops") else 100)
        paths.append(path)
    return paths


class _Style:
    """Colour, shade, marker and legend label of each group in one (dataset, model)'s figures."""

    def __init__(self, colors: dict[tuple, str], per: dict[tuple, list[tuple]], show_tag: bool):
        self.colors, self.per, self.show_tag = colors, per, show_tag
        others = [c for c in per if c[0] != VANILLA]
        self.markers = {c: "*" if c[0] == VANILLA else _MARKERS[others.index(c) % len(_MARKERS)] for c in per}

    def label(self, c: tuple) -> str:
        return _label(c, self.show_tag)

    def line(self, key: tuple) -> tuple[Any, str | None]:
        """(colour, legend label) of one group's curves: the method's colour, darker for its larger
        variants; the label on its first variant only, so each method is one legend entry."""
        c = contender(key)
        ks = self.per[c]
        i = ks.index(key)
        return _shade(self.colors[c], i, len(ks)), (self.label(c) if i == 0 else None)


# ---------------------------------------------------------------------------- accuracy vs FLOPs


def _acc_flops_figure(groups: dict[tuple, list], style: _Style, ds: str, model: str) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(10.5, 5.5))
    ax = fig.add_subplot()
    ax.axhline(0.0, color="gray", ls=":", lw=1, zorder=1)
    xs_all: list[float] = []
    unpaired = 0
    for c, ks in style.per.items():
        pts = []
        for k in ks:
            rs = groups[k]
            fm, fs = stats([r.flops_reduction for r in rs])
            dm, ds_ = stats([None if r.acc_delta is None else 100.0 * r.acc_delta for r in rs])
            if fm is None or dm is None:
                unpaired += 1
                continue
            pts.append((fm, dm, fs or 0.0, ds_ or 0.0))
        if not pts:
            continue
        pts.sort()
        xs_all += [p[0] + p[2] for p in pts] + [max(p[0] - p[2], 1e-3) for p in pts]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[p[2] for p in pts], yerr=[p[3] for p in pts],
                    fmt=style.markers[c] + "-", ms=13 if c[0] == VANILLA else 8, lw=1.2, color=style.colors[c],
                    capsize=3, label=style.label(c), zorder=3, alpha=0.9)
    ax.set_xscale("log")
    if xs_all:
        lo, hi = min(xs_all + [1.0]) / 1.15, max(xs_all + [1.0]) * 1.15
        ax.set_xlim(lo, hi)
        ticks = [2.0 ** e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        ax.set_xticks([t for t in ticks if lo <= t <= hi])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("FLOPs reduction vs vanilla (vanilla FLOPs / run FLOPs, log scale)")
    ax.set_ylabel("test accuracy change vs vanilla (pp, mean ± std over seeds)")
    ax.set_title(f"{ds} / {model}: accuracy change vs FLOPs reduction\n{_reference_line(groups)}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if unpaired:
        ax.annotate(f"{unpaired} group(s) without a vanilla twin not shown", (0.01, 0.01),
                    xycoords="axes fraction", fontsize=8, color="gray")
    fig.tight_layout()
    return fig


def _reference_line(groups: dict[tuple, list]) -> str:
    """'vanilla test accuracy 91.50%, majority class 10.00%' for the plot's title."""
    van = [stats([r.get("test_acc") for r in rs])[0] for k, rs in groups.items() if k[2] == VANILLA and not k[3]]
    van = [v for v in van if v is not None]
    mj, _ = stats([r.get("majority_acc") for rs in groups.values() for r in rs])
    parts = []
    if van:
        lo, hi = min(van), max(van)
        parts.append(f"vanilla test accuracy {100 * lo:.2f}%" if hi - lo < 5e-5
                     else f"vanilla test accuracy {100 * lo:.2f}-{100 * hi:.2f}%")
    if mj is not None:
        parts.append(f"majority class {100 * mj:.2f}%")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- curves over training


def _mean_curve(histories: list[list[dict]], col: str, kinds: tuple[str, ...] = ("step",)) -> tuple[list, list]:
    """Mean over seeds of one history column, per step (steps where any seed has a value)."""
    by_step: dict[float, list[float]] = defaultdict(list)
    for h in histories:
        seen: set[float] = set()
        for row in h:
            if row["kind"] in kinds and col in row and math.isfinite(row[col]):
                s = row["step"]
                if s in seen and row["kind"] == "epoch":  # same step as a step row: keep the post-rehash value
                    by_step[s][-1] = row[col]
                    continue
                seen.add(s)
                by_step[s].append(row[col])
    xs = sorted(by_step)
    return xs, [statistics.fmean(by_step[s]) for s in xs]


def _total_curve(histories: list[list[dict]], cols: list[str], squared: bool = False) -> tuple[list, list]:
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


def _columns(hist: dict[tuple, list], prefix: str) -> list[str]:
    return sorted({c for hs in hist.values() for h in hs for row in h for c in row if c.startswith(prefix)})


def _per_column(ax, hs: list, cols: list[str], color, label: str | None, lw: float, kinds: tuple[str, ...],
                squared: bool = False, **kw) -> None:
    """One line per column (line style per column) when there are few, else their total."""
    curves = [_mean_curve(hs, col, kinds) for col in cols] if len(cols) <= _MAX_LINES else \
        [_total_curve(hs, cols, squared=squared)]
    for j, (x, y) in enumerate(curves):
        ax.plot(x, y, color=color, ls=_LINESTYLES[j % 4], lw=lw, label=label if j == 0 else None,
                marker="o" if len(x) <= 10 else None, ms=3, **kw)  # a few logged steps stay visible


def _style_legend(ax, cols: list[str], prefix: str) -> None:
    """Second legend of a per-column panel: which line style is which site/layer."""
    if 1 < len(cols) <= _MAX_LINES:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="gray", ls=_LINESTYLES[j % 4], label=n[len(prefix):])
                   for j, n in enumerate(cols)]
        ax.add_artist(ax.legend(handles=handles, fontsize=8, loc="best", title=prefix.rstrip("/")))


def _finish(fig, axes, title: str, handles_from) -> None:
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    handles, labels = handles_from.get_legend_handles_labels()
    ncol = min(3, max(1, len(labels)))
    rows = math.ceil(len(labels) / ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, min(0.04 + 0.028 * rows, 0.4), 1, 1))


def _draw_groups(hist: dict[tuple, list], style: _Style, draw: Callable[[list, Any, str | None, float], None]) -> None:
    """``draw(histories, colour, label, line width)`` for every group with a history; earlier
    groups wider, so a curve lying on top of another leaves it visible."""
    for i, (k, hs) in enumerate(hist.items()):
        if hs:
            color, label = style.line(k)
            draw(hs, color, label, max(3.2 - 0.5 * i, 1.0))


def _curves_figure(hist: dict[tuple, list], style: _Style, ds: str, model: str) -> Figure:
    from matplotlib.figure import Figure

    sites = _columns(hist, "width/")
    fig = Figure(figsize=(13, 10))
    axes = fig.subplots(2, 2)
    ax_loss, ax_width, ax_time, ax_acc = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    tops: list[float] = []

    def draw(hs, c, label, lw):
        x, y = _mean_curve(hs, "loss")
        ax_loss.plot(x, y, color=c, label=label, lw=lw)
        x, y = _mean_curve(hs, "step_time_s")
        if y:
            ax_time.plot(x, [v * 1e3 for v in y], color=c, lw=1)
            tops.append(sorted(y)[int(0.95 * (len(y) - 1))] * 1e3)
        _per_column(ax_width, hs, sites, c, label, lw, ("step", "epoch"), drawstyle="steps-post")
        x, y = _mean_curve(hs, "test_acc", ("epoch",))
        ax_acc.plot(x, [100 * v for v in y], color=c, lw=lw, marker="o", ms=4)

    _draw_groups(hist, style, draw)
    ax_loss.set_title("training loss")
    if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax_loss.lines):
        ax_loss.set_yscale("log")
    ax_width.set_title("width per site" if len(sites) <= _MAX_LINES else f"total width over {len(sites)} sites")
    ax_time.set_title("time per step (ms)")
    if tops:
        ax_time.set_ylim(0, 1.5 * max(tops))
    ax_acc.set_title("test accuracy % (epoch rows)")
    _style_legend(ax_width, sites, "width/")
    _finish(fig, axes.flat, f"{ds} / {model}: training curves (mean over seeds)", ax_loss)
    return fig


def _with_gap(h: list[dict]) -> list[dict]:
    """Epoch rows with ``gap_pp`` = 100 (train_acc - test_acc) added."""
    return [dict(r, gap_pp=100.0 * (r["train_acc"] - r["test_acc"])) for r in h
            if r["kind"] == "epoch" and "train_acc" in r and "test_acc" in r]


def _regularization_figure(hist: dict[tuple, list], style: _Style, ds: str, model: str) -> Figure | None:
    from matplotlib.figure import Figure

    wn, gn = _columns(hist, "wnorm/"), _columns(hist, "gnorm/")
    has_gap = any(_with_gap(h) for hs in hist.values() for h in hs)
    if not (has_gap or wn or gn):
        return None
    fig = Figure(figsize=(17, 5.8))
    ax_gap, ax_w, ax_g = fig.subplots(1, 3)

    def draw(hs, c, label, lw):
        x, y = _mean_curve([_with_gap(h) for h in hs], "gap_pp", ("epoch",))
        ax_gap.plot(x, y, color=c, label=label, lw=lw, marker="o", ms=4)
        _per_column(ax_w, hs, wn, c, label, lw, ("step",), squared=True)
        _per_column(ax_g, hs, gn, c, label, lw, ("step",), squared=True)

    _draw_groups(hist, style, draw)
    ax_gap.axhline(0.0, color="gray", ls=":", lw=1)
    ax_gap.set_title("train − test accuracy gap (pp, per epoch)" if has_gap else "train − test gap: not recorded")
    many = len(wn) > _MAX_LINES
    ax_w.set_title(f"weight norm, all {len(wn)} layers" if many else "weight norm per layer" if wn
                   else "weight norm: not recorded")
    many = len(gn) > _MAX_LINES
    ax_g.set_title(f"gradient norm, all {len(gn)} layers" if many else "gradient norm per layer" if gn
                   else "gradient norm: not recorded")
    ys = [v for line in ax_g.lines for v in line.get_ydata()]
    if ys and min(ys) > 0 and max(ys) > 20 * min(ys):  # gradient norms span decades early in training
        ax_g.set_yscale("log")
    _style_legend(ax_w, wn, "wnorm/")
    _style_legend(ax_g, gn, "gnorm/")
    _finish(fig, (ax_gap, ax_w, ax_g), f"{ds} / {model}: regularization (mean over seeds)", ax_gap)
    return fig
