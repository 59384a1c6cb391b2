"""hashexp.results on hand-made run dirs with known numbers: discovery, pairing with the vanilla
twin, reductions and speedups, mean/std over seeds, failed/unfinished runs, --sweep/--since/--until,
the files written (markdown, CSVs, non-empty PNGs) and the CLI's error lines."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

from hashexp import results as R

D0 = "2026-11-20"  # sweep A: vanilla, simhash, magnitude x 3 seeds (+ a failed and an unfinished job)
D1 = "2026-11-22"  # sweep B: mips runs only, paired with sweep A's vanilla runs
D2 = "2026-11-25"  # single runs: a small net from scratch and a hashed run on other data

VANILLA = {"acc": [0.90, 0.92, 0.94], "wall": [10.0, 12.0, 14.0], "train": [8.0, 9.0, 10.0]}
SIMHASH = {"acc": [0.88, 0.90, 0.92], "wall": [5.0, 4.0, 7.0], "train": [4.0, 3.0, 5.0]}
MAGNITUDE = {"acc": [0.80, 0.82, 0.87], "wall": [10.0, 12.0, 14.0], "train": [8.0, 9.0, 10.0]}


def config(hashing: str, seed: int, widths=(256, 256), n_samples=1000, tag="", threshold=0.7) -> dict:
    hcfg = {"name": hashing, "_target_": None if hashing == "none" else f"x.{hashing}"}
    if hashing in ("simhash", "mips"):
        hcfg.update(threshold=threshold, target_ratio=None)
    elif hashing != "none":
        hcfg.update(target_ratio=0.5)
    return {
        "dataset": {"_target_": "hashexp.data.synthetic.load_synthetic", "name": "synthetic", "root": None,
                    "n_samples": n_samples, "seed": None},
        "model": {"_target_": "hashexp.models.mlp.MLP", "name": "mlp", "widths": list(widths), "activation": "relu"},
        "hashing": hcfg,
        "schedule": {"_target_": "hashexp.schedules.fixed.FixedSchedule", "name": "fixed", "every": 1},
        "trainer": {"_target_": "hashexp.train.Trainer", "name": "adam", "epochs": 2, "batch_size": 64,
                    "progress": "none", "log_every": 10, "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.001}},
        "logger": {"_target_": "hashexp.loggers.CsvLogger", "name": "csv"},
        "seed": seed, "tag": tag,
    }


def history(path: Path, widths: tuple[int, int], final: tuple[int, int], step_time: float, seed: int) -> None:
    cols = ["kind", "step", "epoch", "loss", "step_time_s", "lr", "params", "rehash", "hash_time_s", "width/fc1",
            "width/fc2", "wnorm/layers.0", "wnorm/layers.1", "wnorm/layers.2", "gnorm/layers.0", "gnorm/layers.1",
            "gnorm/layers.2", "train_loss", "train_acc", "test_loss", "test_acc", "flops"]
    rows = []
    for step in (10, 20, 30, 40):
        w = widths if step <= 20 else final
        rows.append({"kind": "step", "step": step, "epoch": (step - 1) // 20, "loss": 1.0 / step + 0.01 * seed,
                     "step_time_s": step_time * (1.5 if step == 10 else 1.0), "params": 100, "rehash": 0,
                     "width/fc1": w[0], "width/fc2": w[1], "wnorm/layers.0": 5 + step / 10, "wnorm/layers.1": 4.0,
                     "wnorm/layers.2": 1.0, "gnorm/layers.0": 0.1, "gnorm/layers.1": 0.1, "gnorm/layers.2": 0.1})
        if step in (20, 40):
            rows.append({"kind": "epoch", "step": step, "epoch": step // 20, "width/fc1": final[0],
                         "width/fc2": final[1], "train_loss": 0.3, "train_acc": 0.9 + 0.02 * step / 20 + 0.01 * seed,
                         "test_loss": 0.3,
                         "test_acc": 0.9, "flops": 100, "params": 100, "rehash": int(widths != final)})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def sweep_dir(path: Path, when: str) -> Path:
    path.mkdir(parents=True)
    (path / "multirun.yaml").write_text("hydra: {}\n")
    t = dt.datetime.strptime(when, "%Y-%m-%d").timestamp()
    os.utime(path / "multirun.yaml", (t, t))
    return path


def make_run(run_dir: Path, hashing: str, seed: int, acc: float, flops: int, params: int, wall: float, train: float,
             widths=(256, 256), final=None, when: str = D0, **cfg_kw) -> Path:
    final = final or widths
    run_dir.mkdir(parents=True)
    cfg = config(hashing, seed, widths=widths, **cfg_kw)
    hyd = run_dir / ".hydra"
    hyd.mkdir()
    (hyd / "config.yaml").write_text(yaml.safe_dump(cfg))
    overrides = ["dataset=synthetic", f"hashing={hashing}", f"seed={seed}"]
    if widths != (256, 256):
        overrides.append(f"model.widths=[{widths[0]},{widths[1]}]")
    (hyd / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    choices = {"dataset": "synthetic", "model": "mlp", "hashing": hashing, "schedule": "fixed", "trainer": "adam",
               "logger": "csv", "hydra/launcher": "basic"}
    (hyd / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    metrics = {"status": "ok", "test_acc": acc, "train_acc": acc + 0.01, "majority_acc": 0.7, "flops": flops,
               "params": params, "widths": {"fc1": final[0], "fc2": final[1]},
               "widths_before": {"fc1": widths[0], "fc2": widths[1]}, "wall_time_s": wall, "train_time_s": train,
               "hash_time_s": 0.0 if hashing == "none" else 0.5, "eval_time_s": 0.1, "rehashes": int(hashing != "none"),
               "rehash_events": [], "peak_rss_mb": 500.0, "seed": seed, "tag": cfg["tag"],
               "groups": {k: v for k, v in choices.items() if not k.startswith("hydra")}, "dataset": "synthetic",
               "model": "mlp", "hashing": hashing, "schedule": "fixed", "epochs": 2, "steps": 40, "world_size": 1}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    history(run_dir / "history.csv", widths, final, 0.01 * flops / 1000, seed)
    t = dt.datetime.strptime(when, "%Y-%m-%d").timestamp() + 3600 + seed
    for p in [run_dir / "metrics.json", run_dir]:
        os.utime(p, (t, t))
    return run_dir


@pytest.fixture
def outputs(tmp_path) -> Path:
    return build_outputs(tmp_path)


def build_outputs(tmp_path: Path) -> Path:
    """The outputs tree of the tests: two multiruns, single runs, a failed and an unfinished job."""
    out = tmp_path / "outputs"
    sweep_a = sweep_dir(out / "multirun" / D0 / "10-00-00_sweep_a", D0)
    j = 0
    for hashing, spec, flops, params in (("none", VANILLA, 1000, 400), ("simhash", SIMHASH, 250, 100),
                                         ("magnitude", MAGNITUDE, 500, 200)):
        for seed in range(3):
            make_run(sweep_a / f"{j}_synthetic_mlp_{hashing}_s{seed}", hashing, seed, spec["acc"][seed], flops,
                     params, spec["wall"][seed], spec["train"][seed], final=(64, 64) if hashing != "none" else None)
            j += 1
    # a job that failed, and one still running (or killed): .hydra/ and history, no metrics.json
    failed = sweep_a / f"{j}_synthetic_mlp_simhash_s3"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config("simhash", 3)))
    (failed / "status.json").write_text(json.dumps({"status": "failed", "error": "DataError: boom\nsecond line",
                                                    "groups": {"dataset": "synthetic", "hashing": "simhash"}}))
    unfinished = sweep_a / f"{j + 1}_synthetic_mlp_random_s0"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config("random", 0)))
    history(unfinished / "history.csv", (256, 256), (128, 128), 0.005, 0)
    # .submitit/ and wandb/ trees are never scanned
    (sweep_a / ".submitit" / "123").mkdir(parents=True)
    (sweep_a / ".submitit" / "123" / "metrics.json").write_text("{}")

    sweep_b = sweep_dir(out / "multirun" / D1 / "09-30-00_sweep_b", D1)
    for seed in range(2):
        make_run(sweep_b / f"{seed}_synthetic_mlp_mips_s{seed}", "mips", seed, 0.9, 200, 80, 6.0, 4.0,
                 final=(48, 48), when=D1)
    runs = out / "runs" / D2
    # small network from scratch (tag "scratch"): compared with the widest vanilla run of its tag
    make_run(runs / "12-00-00-000000_synthetic_mlp_none_s0", "none", 0, 0.85, 1000, 400, 10.0, 8.0, tag="scratch",
             when=D2)
    make_run(runs / "12-05-00-000000_synthetic_mlp_none_s0", "none", 0, 0.80, 100, 40, 4.0, 2.0, widths=(32, 32),
             tag="scratch", when=D2)
    # hashed run on other data (n_samples=500): no vanilla twin
    make_run(runs / "13-00-00-000000_synthetic_mlp_simhash_s0", "simhash", 0, 0.7, 250, 100, 5.0, 4.0,
             final=(64, 64), n_samples=500, when=D2)
    return out


def by_dir(runs) -> dict[str, dict]:
    return {Path(r["run_dir"]).name: r for r in runs}


def test_discovery_status_and_pairing(outputs):
    runs = R.collect_runs([str(outputs)])
    status = sorted((r["status"], Path(r["run_dir"]).name) for r in runs if r["status"] != "ok")
    assert status == [("failed", "9_synthetic_mlp_simhash_s3"), ("unfinished", "10_synthetic_mlp_random_s0")]
    assert sum(r["status"] == "ok" for r in runs) == 9 + 2 + 3
    rs = by_dir(runs)
    assert rs["9_synthetic_mlp_simhash_s3"]["error"].startswith("DataError: boom")
    assert rs["10_synthetic_mlp_random_s0"]["error"] == "epoch 2/2"  # two epoch rows in its history
    for seed in range(3):
        sim, van = rs[f"{3 + seed}_synthetic_mlp_simhash_s{seed}"], rs[f"{seed}_synthetic_mlp_none_s{seed}"]
        assert sim["vanilla_dir"] == van["run_dir"]
        assert sim["flops_reduction"] == pytest.approx(4.0) and sim["params_reduction"] == pytest.approx(4.0)
        assert sim["wall_speedup"] == pytest.approx(VANILLA["wall"][seed] / SIMHASH["wall"][seed])
        assert sim["train_speedup"] == pytest.approx(VANILLA["train"][seed] / SIMHASH["train"][seed])
        assert sim["acc_delta"] == pytest.approx(SIMHASH["acc"][seed] - VANILLA["acc"][seed])
        assert van["vanilla_dir"] == van["run_dir"] and van["wall_speedup"] == 1.0  # its own twin
    # another multirun's hashed runs pair with sweep A's vanilla runs of the same seed
    assert rs["0_synthetic_mlp_mips_s0"]["vanilla_dir"] == rs["0_synthetic_mlp_none_s0"]["run_dir"]
    assert rs["1_synthetic_mlp_mips_s1"]["flops_reduction"] == pytest.approx(5.0)
    # other data: no twin, no ratios
    other = rs["13-00-00-000000_synthetic_mlp_simhash_s0"]
    assert other.get("vanilla_dir") is None and other.get("flops_reduction") is None
    # the small network from scratch against the widest vanilla run of its tag
    small, wide = rs["12-05-00-000000_synthetic_mlp_none_s0"], rs["12-00-00-000000_synthetic_mlp_none_s0"]
    assert small["vanilla_dir"] == wide["run_dir"] and small["flops_reduction"] == pytest.approx(10.0)
    assert small["acc_delta"] == pytest.approx(-0.05) and wide["vanilla_dir"] == wide["run_dir"]
    # run dates come from the dir names
    assert rs["0_synthetic_mlp_mips_s0"]["date"] == dt.datetime(2026, 11, 22, 9, 30, 0)
    assert rs["12-05-00-000000_synthetic_mlp_none_s0"]["date"] == dt.datetime(2026, 11, 25, 12, 5, 0)


def test_vanilla_twin_prefers_the_same_multirun_and_needs_the_same_setup(outputs):
    # a second vanilla run of seed 0 in another multirun, newer: sweep A's hashed runs keep sweep A's
    other = sweep_dir(outputs / "multirun" / D1 / "11-00-00_other", "2026-11-19")  # not the latest sweep
    make_run(other / "5_synthetic_mlp_none_s0", "none", 0, 0.5, 1000, 400, 1.0, 1.0, when=D1)
    # ... and one with another learning rate, which no run may pair with
    lr = outputs / "runs" / D1 / "08-00-00-000000_synthetic_mlp_none_s1"
    make_run(lr, "none", 1, 0.5, 1000, 400, 1.0, 1.0, when=D1)
    cfg = yaml.safe_load((lr / ".hydra" / "config.yaml").read_text())
    cfg["trainer"]["optimizer"]["lr"] = 0.1
    (lr / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    rs = by_dir(R.collect_runs([str(outputs)]))
    sweep_a = outputs / "multirun" / D0 / "10-00-00_sweep_a"
    assert rs["3_synthetic_mlp_simhash_s0"]["vanilla_dir"] == str(sweep_a / "0_synthetic_mlp_none_s0")
    assert rs["4_synthetic_mlp_simhash_s1"]["vanilla_dir"] == str(sweep_a / "1_synthetic_mlp_none_s1")
    assert rs[lr.name]["vanilla_dir"] == str(lr)  # paired with itself only
    # the newer vanilla run of seed 0 (sweep "other") supersedes sweep A's in the vanilla row
    assert rs["0_synthetic_mlp_none_s0"]["superseded"] and not rs["5_synthetic_mlp_none_s0"]["superseded"]
    row = next(r for r in R.summarize(list(rs.values())) if r["hashing"] == "none" and not r["tag"]
               and "0.001" in r["variant"])
    assert row["n"] == 3 and row["test_acc_mean"] == pytest.approx((0.5 + 0.92 + 0.94) / 3)


def test_summary_mean_std_over_seeds(outputs):
    rows = R.summarize(R.collect_runs([str(outputs)]))
    keyed = {(r["hashing"], r["tag"], r["variant"]): r for r in rows}
    sim = next(r for r in rows if r["hashing"] == "simhash" and r["n"] == 3)
    assert sim["seeds"] == "0 1 2" and sim["n_paired"] == 3
    assert sim["test_acc_mean"] == pytest.approx(0.90) and sim["test_acc_std"] == pytest.approx(0.02)
    speed = [v / s for v, s in zip(VANILLA["wall"], SIMHASH["wall"])]
    assert sim["wall_speedup_mean"] == pytest.approx(statistics.mean(speed))
    assert sim["wall_speedup_std"] == pytest.approx(statistics.stdev(speed))
    train = [v / s for v, s in zip(VANILLA["train"], SIMHASH["train"])]
    assert sim["train_speedup_mean"] == pytest.approx(statistics.mean(train))
    assert sim["flops_reduction_mean"] == pytest.approx(4.0) and sim["flops_reduction_std"] == pytest.approx(0.0)
    assert sim["acc_delta_mean"] == pytest.approx(-0.02)
    assert sim["majority_acc_mean"] == pytest.approx(0.7) and sim["widths"] == {"fc1": 64.0, "fc2": 64.0}
    assert sim["command"] == "python -m hashexp -m dataset=synthetic hashing=simhash seed=0,1,2"
    # the other-data simhash run is its own variant (the config key that differs is named)
    other = keyed[("simhash", "", "dataset.n_samples=500")]
    assert other["n"] == 1 and other["n_paired"] == 0 and other["flops_reduction_mean"] is None
    assert keyed[("simhash", "", "dataset.n_samples=1000")]["n"] == 3
    mag = keyed[("magnitude", "", "")]
    assert mag["test_acc_mean"] == pytest.approx(statistics.mean(MAGNITUDE["acc"]))
    assert mag["test_acc_std"] == pytest.approx(statistics.stdev(MAGNITUDE["acc"]))
    assert mag["wall_speedup_mean"] == pytest.approx(1.0) and mag["flops_reduction_mean"] == pytest.approx(2.0)
    mips = keyed[("mips", "", "")]
    assert mips["n"] == 2 and mips["flops_reduction_mean"] == pytest.approx(5.0) and mips["test_acc_std"] == 0.0
    # vanilla first; the small-from-scratch rows name their widths
    assert rows[0]["hashing"] == "none"
    scratch = keyed[("none", "scratch", "model.widths=[32,32]")]
    assert scratch["n"] == 1 and scratch["test_acc_std"] is None
    assert scratch["flops_reduction_mean"] == pytest.approx(10.0)


def test_sweep_and_date_filters(outputs):
    sweep_b = outputs / "multirun" / D1 / "09-30-00_sweep_b"
    runs = R.collect_runs([str(outputs)], sweep=str(sweep_b))
    assert sorted(Path(r["run_dir"]).name for r in runs) == ["0_synthetic_mlp_mips_s0", "1_synthetic_mlp_mips_s1"]
    assert all(r["vanilla_dir"] and "sweep_a" in r["vanilla_dir"] for r in runs)  # twins found outside the sweep
    assert {r["run_dir"] for r in R.collect_runs([str(outputs)], sweep="latest")} == {r["run_dir"] for r in runs}
    # the sweep alone: no vanilla runs in it, so no ratios
    alone = R.collect_runs([str(sweep_b)])
    assert len(alone) == 2 and all(r.get("flops_reduction") is None for r in alone)
    assert {Path(r["run_dir"]).parent.name for r in R.collect_runs([str(outputs)], since="2026-11-23")} == {D2}
    until = R.collect_runs([str(outputs)], until=D0)
    assert len(until) == 11 and {r["date"].date() for r in until} == {dt.date(2026, 11, 20)}
    between = R.collect_runs([str(outputs)], since="2026-11-21", until="2026-11-22")
    assert len(between) == 2
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        R.collect_runs([str(outputs)], since="20-11-2026")


def test_cli_writes_tables_csvs_and_plots(outputs, tmp_path, capsys):
    out = tmp_path / "tables"
    assert R.main([str(outputs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| synthetic | mlp | simhash |" in printed and "Failed / unfinished" in printed
    md = (out / "results.md").read_text()
    assert "0.9000 ± 0.0200" in md  # simhash accuracy over 3 seeds
    assert "| 0.7000 |" in md  # majority-class accuracy next to it
    assert "4.00× ± 0.00" in md  # FLOPs reduction
    assert "## Failed / unfinished" in md and "DataError: boom" in md and "second line" not in md
    assert "**unfinished**" in md and "10_synthetic_mlp_random_s0" in md and "epoch 2/2" in md
    assert "python -m hashexp -m dataset=synthetic hashing=simhash seed=0,1,2" in md
    summary = list(csv.DictReader((out / "results.csv").open()))
    sim = next(r for r in summary if r["hashing"] == "simhash" and r["n"] == "3")
    assert float(sim["test_acc_mean"]) == pytest.approx(0.9) and float(sim["flops_reduction_mean"]) == 4.0
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 16 and {r["status"] for r in runs} == {"ok", "failed", "unfinished"}
    one = next(r for r in runs if r["run_dir"].endswith("4_synthetic_mlp_simhash_s1"))
    assert float(one["wall_speedup"]) == pytest.approx(3.0) and one["vanilla_dir"].endswith("1_synthetic_mlp_none_s1")
    assert json.loads(one["widths"]) == {"fc1": 64, "fc2": 64} and one["command"].startswith("python -m hashexp ")
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["acc_flops_synthetic_mlp.png", "curves_synthetic_mlp.png",
                                      "regularization_synthetic_mlp.png"]
    for p in pngs:
        assert p.stat().st_size > 10_000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p.name})" in md


def test_make_plots_one_figure_set_per_dataset_model(outputs, tmp_path):
    runs = R.collect_runs([str(outputs)])
    # a second model: its own pair of figures
    extra = outputs / "runs" / D2 / "14-00-00-000000_synthetic_resnet20_none_s0"
    make_run(extra, "none", 0, 0.6, 5000, 900, 30.0, 25.0, when=D2)
    m = json.loads((extra / "metrics.json").read_text())
    m["model"] = "resnet20"
    (extra / "metrics.json").write_text(json.dumps(m))
    runs = R.collect_runs([str(outputs)])
    paths = R.make_plots(runs, str(tmp_path / "plots"))
    assert sorted(Path(p).name for p in paths) == [f"{kind}_synthetic_{m}.png" for kind in ("acc_flops", "curves",
                                                   "regularization") for m in ("mlp", "resnet20")]
    assert all(Path(p).stat().st_size > 10_000 for p in paths)


def test_cli_no_plots_and_errors(outputs, tmp_path, capsys):
    out = tmp_path / "t"
    sweep_b = outputs / "multirun" / D1 / "09-30-00_sweep_b"
    assert R.main([str(outputs), "--sweep", str(sweep_b), "--out", str(out), "--no-plots"]) == 0
    assert not list(out.glob("*.png"))
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 2
    capsys.readouterr()
    assert R.main([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert R.main([str(outputs), "--since", "yesterday"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    assert R.main([str(outputs), "--sweep", str(tmp_path / "nope")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.main([str(empty)]) == 0
    assert "no run directories" in capsys.readouterr().err
    # a broken metrics.json is listed as failed, the rest is still tabulated
    bad = outputs / "multirun" / D0 / "10-00-00_sweep_a" / "0_synthetic_mlp_none_s0" / "metrics.json"
    bad.write_text("{not json")
    runs = R.collect_runs([str(outputs)])
    broken = next(r for r in runs if r["run_dir"] == str(bad.parent))
    assert broken["status"] == "failed" and "metrics.json unreadable" in broken["error"]
    assert R.summarize(runs)


def _legend_labels(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_acc_flops_plot_is_pp_change_vs_flops_reduction(outputs):
    from matplotlib.colors import to_rgb

    runs = R.collect_runs([str(outputs)])
    rows = R.summarize(runs)
    figs = R.plot_figures(runs)
    ax = figs["acc_flops_synthetic_mlp.png"].axes[0]
    assert ax.get_xscale() == "log"
    labels = _legend_labels(ax.get_legend())
    assert sorted(labels) == ["magnitude", "mips", "simhash", "vanilla", "vanilla [scratch]"]  # one entry each
    curves = {c.get_label(): c for c in ax.containers}
    for method in ("simhash", "magnitude", "mips"):
        line = curves[method].lines[0]
        paired = [r for r in rows if r["hashing"] == method and r["n_paired"]]  # the twinless simhash run is left out
        assert list(line.get_xdata()) == pytest.approx([r["flops_reduction_mean"] for r in paired])
        assert list(line.get_ydata()) == pytest.approx([100 * r["acc_delta_mean"] for r in paired])
    # the small network from scratch: its two widths are one curve, from 1x to 10x fewer FLOPs
    scratch = curves["vanilla [scratch]"].lines[0]
    assert list(scratch.get_xdata()) == pytest.approx([1.0, 10.0]) and list(scratch.get_ydata()) == pytest.approx([0, -5])
    assert list(curves["vanilla"].lines[0].get_ydata()) == [0.0]
    # the majority class is named, not drawn: the y range is the pp spread of the methods
    assert "majority class 70.00%" in ax.get_title() and "vanilla test accuracy 92.00%" in ax.get_title()
    lo, hi = ax.get_ylim()
    assert -15 < lo < -5 and 0 < hi < 5
    assert to_rgb(curves["simhash"].lines[0].get_color()) == to_rgb("tab:blue")


def test_regularization_plot_gap_and_norms_hashed_vs_vanilla(outputs):
    from matplotlib.colors import to_rgb

    figs = R.plot_figures(R.collect_runs([str(outputs)]))
    fig = figs["regularization_synthetic_mlp.png"]
    ax_gap, ax_w, ax_g = fig.axes
    assert _legend_labels(fig.legends[0]) == ["vanilla", "vanilla [scratch]", "magnitude", "mips", "simhash"]
    by = {line.get_label(): line for line in ax_gap.lines}
    # train_acc - test_acc of the fixture's epoch rows: 2 pp per epoch + 1 pp per seed; seeds 0-2
    assert list(by["simhash"].get_xdata()) == [20.0, 40.0]
    assert list(by["simhash"].get_ydata()) == pytest.approx([3.0, 5.0])
    assert list(by["mips"].get_ydata()) == pytest.approx([2.5, 4.5])  # seeds 0-1
    assert "gap" in ax_gap.get_title() and ax_w.get_title() == "weight norm per layer"
    assert ax_g.get_title() == "gradient norm per layer"
    # one line per layer (3) for each of the 7 groups; wnorm/layers.0 = 5 + step / 10
    assert len(ax_w.lines) == 21 and len(ax_g.lines) == 21
    first = next(line for line in ax_w.lines if line.get_label() == "simhash")
    assert list(first.get_ydata()) == pytest.approx([6.0, 7.0, 8.0, 9.0])
    assert all(list(line.get_ydata()) == pytest.approx([0.1] * 4) for line in ax_g.lines)
    # each method in one colour in all figures
    acc = {c.get_label(): c.lines[0].get_color() for c in figs["acc_flops_synthetic_mlp.png"].axes[0].containers}
    loss = {line.get_label(): line.get_color() for line in figs["curves_synthetic_mlp.png"].axes[0].lines}
    for method in ("vanilla", "simhash", "magnitude", "mips"):
        assert to_rgb(acc[method]) == to_rgb(by[method].get_color()) == to_rgb(loss[method])


def test_cli_without_runs_says_make_run_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HASHEXP_OUTPUTS", str(tmp_path / "outputs"))
    assert R.main([]) == 0  # no outputs dir yet: a hint, not a failure
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "make run" in err
    (tmp_path / "outputs").mkdir()
    assert R.main([]) == 0  # an empty one
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no run directories" in err and "make run" in err


def test_make_results_table_without_runs_exits_0(tmp_path):
    """`make results-table` on a fresh clone: the hint on stderr, exit status 0 (make prints no Error 1)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    # -o: treat the install stamp as up to date (no pip in a test); PY: this interpreter
    proc = subprocess.run(["make", "-f", str(root / "Makefile"), "-o", ".venv/.hashexp-installed", "results-table",
                           f"PY={sys.executable}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "make run" in proc.stderr and "Error" not in proc.stderr
    assert (tmp_path / "outputs").is_dir() and not (tmp_path / "outputs" / "results").exists()
