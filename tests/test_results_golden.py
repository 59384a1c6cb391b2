"""The tables' numbers do not move: on the test_results fixture tree (plus a superseded vanilla run
and a learning-rate variant), the markdown table, results.md (no plots), results.csv and runs.csv
equal golden files written by the single-module hashexp/results.py of commit 503c3a5.

Regenerate (only when a change of the numbers is intended) or compare two implementations::

    python tests/test_results_golden.py --write                       # golden <- hashexp.results
    python tests/test_results_golden.py --module /tmp/old_results.py  # that module vs hashexp.results
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_results import D1, build_outputs, make_run, sweep_dir  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "results_golden"
FILES = ("table.md", "results.md", "results.csv", "runs.csv")


def golden_tree(tmp_path: Path) -> Path:
    out = build_outputs(tmp_path)
    other = sweep_dir(out / "multirun" / D1 / "11-00-00_other", "2026-11-19")
    make_run(other / "5_synthetic_mlp_none_s0", "none", 0, 0.5, 1000, 400, 1.0, 1.0, when=D1)  # supersedes seed 0
    lr = out / "runs" / D1 / "08-00-00-000000_synthetic_mlp_none_s1"
    make_run(lr, "none", 1, 0.5, 1000, 400, 1.0, 1.0, when=D1)
    cfg = yaml.safe_load((lr / ".hydra" / "config.yaml").read_text())
    cfg["trainer"]["optimizer"]["lr"] = 0.1
    (lr / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out


def render(results_module, outputs: Path, out_dir: Path) -> dict[str, str]:
    """The four texts, with the tree's location replaced by <outputs>."""
    runs = results_module.collect_runs([str(outputs)])
    res = results_module.write_results(runs, str(out_dir), plots=False)
    texts = {"table.md": results_module.markdown_table(res["rows"])}
    for name in FILES[1:]:
        texts[name] = (out_dir / name).read_text()
    return {k: v.replace(str(outputs), "<outputs>") for k, v in texts.items()}


def test_tables_equal_the_golden_files_of_the_single_module(tmp_path):
    from hashexp import results

    got = render(results, golden_tree(tmp_path), tmp_path / "tables")
    for name in FILES:
        assert got[name] == (GOLDEN / name).read_text(), name


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_results", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="write the golden files from hashexp.results")
    ap.add_argument("--module", help="a results.py file to compare with hashexp.results")
    a = ap.parse_args()
    from hashexp import results

    with tempfile.TemporaryDirectory() as tmp:
        tree = golden_tree(Path(tmp))
        new = render(results, tree, Path(tmp) / "new")
        if a.write:
            GOLDEN.mkdir(parents=True, exist_ok=True)
            for name, text in new.items():
                (GOLDEN / name).write_text(text)
            print(f"wrote {', '.join(FILES)} to {GOLDEN}")
        ref = render(_load(a.module), tree, Path(tmp) / "old") if a.module else \
            {n: (GOLDEN / n).read_text() for n in FILES}
        for name in FILES:
            same = ref[name] == new[name]
            print(f"{name}: {'identical' if same else 'DIFFERENT'} ({len(new[name].splitlines())} lines)")
        sys.exit(0 if all(ref[n] == new[n] for n in FILES) else 1)
