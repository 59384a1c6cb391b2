"""Typed knobs (hashexp/utils/knobs.py): a bad-typed value of any knob of any config group ends in
one line that names the knob, the value and the expected type, before any data is read."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hashexp.app import train_run
from hashexp.errors import ConfigError
from hashexp.utils.knobs import describe, fits, iter_knobs
from tests.conftest import CONF, compose, run_app

GROUPS = ("dataset", "model", "hashing", "schedule", "trainer", "logger")
# a value of another type than the knob takes, in Hydra override syntax and as parsed
BAD = [("abc", "abc"), ("[1,2]", [1, 2]), ("{a: 1}", {"a": 1}), ("1.5", 1.5)]


def _choice_overrides(group: str, choice: str) -> list[str]:
    extra = {"npz": ["dataset.path=x.npz"], "synthetic": [], "imagefolder": ["dataset.root=images"]}.get(
        choice, ["dataset.download=false"])  # never download
    return [f"{group}={choice}"] + (extra if group == "dataset" else [])


def _all_knobs():
    cases = []
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            base = _choice_overrides(group, path.stem)
            for knob, _, expected in iter_knobs(_composed(tuple(base))[group], group):
                cases.append(pytest.param(base, knob, expected, id=f"{path.stem}:{knob}"))
    return cases


@functools.lru_cache(maxsize=None)
def _composed(base: tuple[str, ...]):
    return compose(list(base))


KNOBS = _all_knobs()


def test_every_group_has_typed_knobs():
    groups = {p.values[1].split(".")[0] for p in KNOBS}
    assert groups == set(GROUPS)
    assert len(KNOBS) > 150  # every knob of every conf/<group>/*.yaml (hashing=none has none)
    assert all(p.values[2] is not None for p in KNOBS), [p.id for p in KNOBS if p.values[2] is None]


@pytest.mark.parametrize("base,knob,expected", KNOBS)
def test_a_bad_typed_knob_names_knob_value_and_type(base, knob, expected, tmp_path):
    text, value = next((t, v) for t, v in BAD if not fits(v, expected))
    cfg = copy.deepcopy(_composed(tuple(base)))  # composed once per config file: the suite stays fast
    OmegaConf.update(cfg, knob, value, merge=False)  # as the override `{knob}={text}` sets it
    with pytest.raises(ConfigError) as err:
        train_run(cfg, str(tmp_path / "run"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == f"{knob}={value!r} has the wrong type: expected {describe(expected)}"
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("expected,good,bad", [
    (float, [1, 0.5], ["1", True, None]),
    (int | None, [3, None], [3.0, "3", False]),
    (list[str] | None, [["fc1"], None], ["fc1", [1]]),
    (dict[str, int], [{"fc1": 3}], [{"fc1": "x"}, [3]]),
])
def test_fits(expected, good, bad):
    assert all(fits(v, expected) for v in good)
    assert not any(fits(v, expected) for v in bad)


def test_hydra_parses_the_overrides_as_the_test_sets_them():
    cfg = compose(["hashing=simhash", "hashing.pull=abc", "hashing.target_width=[1,2]", "hashing.bits=1.5"])
    assert cfg.hashing.pull == "abc" and list(cfg.hashing.target_width) == [1, 2] and cfg.hashing.bits == 1.5
    used = {next(t for t, v in BAD if not fits(v, p.values[2])) for p in KNOBS}
    assert used <= {"abc", "[1,2]", "1.5"}  # the spellings checked above


def test_cli_prints_the_cause_in_one_line(tmp_path: Path):
    proc = run_app(tmp_path, ["hashing=simhash", "hashing.max_error=abc"], check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1] == "hashexp: error: hashing.max_error='abc' has the wrong type: expected a number or null"
    assert not re.search(r"Error in call to target", proc.stderr)
