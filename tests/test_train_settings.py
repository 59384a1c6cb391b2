"""The Trainer's typed argument groups: trainer.checkpoint and trainer.logging parse, check and
default the same way from the config group, a bool, or an instance."""

from __future__ import annotations

import pytest

from conftest import compose

from hashexp.errors import ConfigError
from hashexp.train.checkpoint import CheckpointSettings
from hashexp.train.history import LoggingSettings


def test_groups_parse_from_the_composed_config():
    cfg = compose(["trainer.checkpoint.every_steps=7", "trainer.checkpoint.resume=auto", "trainer.logging.every=3",
                   "trainer.logging.progress=none"])
    c = CheckpointSettings.parse(cfg.trainer.checkpoint)
    assert (c.enabled, c.every_steps, c.resume) == (True, 7, "auto")
    lg = LoggingSettings.parse(cfg.trainer.logging)
    assert (lg.every, lg.progress) == (3, "none")
    assert CheckpointSettings.parse(False) == CheckpointSettings(enabled=False)
    assert CheckpointSettings.parse(True) == CheckpointSettings() and CheckpointSettings.parse(c) is c
    assert LoggingSettings.parse(None) == LoggingSettings(every=20, progress="auto")


@pytest.mark.parametrize("parse, value, match", [
    (CheckpointSettings.parse, {"every": 3}, r"trainer.checkpoint: unknown key\(s\) \['every'\]"),
    (CheckpointSettings.parse, {"every_steps": 0}, "trainer.checkpoint.every_steps must be >= 1 or null, got 0"),
    (LoggingSettings.parse, {"every": 0}, "trainer.logging.every must be >= 1, got 0"),
    (LoggingSettings.parse, {"progress": "loud"}, "trainer.logging.progress='loud'; choose auto, bar, log or none"),
    (LoggingSettings.parse, {"rows": 1}, r"trainer.logging: unknown key\(s\) \['rows'\]"),
])
def test_bad_values_are_one_clear_error(parse, value, match):
    with pytest.raises(ConfigError, match=match):
        parse(value)
