"""The shipped config groups (``conf/``) read outside a Hydra run, so one-shot use shares their defaults.

``python -m hashexp`` composes ``conf/`` with Hydra. The one-shot path (``hashexp.compress``,
:func:`hashexp.compress_model`) has no Hydra run; it reads the same option files through
:func:`group_option`, so a default changed in ``conf/hashing/simhash.yaml`` changes both.
tests/test_compress.py checks that what it returns equals Hydra's composition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hashexp.errors import ConfigError

#: the repository's config directory (the Hydra app's ``config_path``)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def group_options(group: str) -> list[str]:
    """The option names of a config group (``conf/<group>/*.yaml``), sorted."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_option(group: str, name: str, resolve: bool = True) -> dict[str, Any]:
    """Option ``name`` of ``group`` as Hydra composes it on its own (``python -m hashexp group=name``).

    The option's defaults list may name other options of the same group (``- simhash``) and
    ``_self_``; they merge in order as Hydra merges them. Interpolations into the rest of the run
    config (``${oc.select:model.merge_budget,0.02}``) take their fallback values.

    Raises:
        ConfigError: no such option, or a defaults entry this reader does not follow.
    """
    node = _compose(group, name, ())
    return OmegaConf.to_container(node, resolve=resolve)  # type: ignore[return-value]


def _compose(group: str, name: str, seen: tuple[str, ...]) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={name}: no conf/{group}/{name}.yaml; choose one of {', '.join(group_options(group))}")
    if name in seen:
        raise ConfigError(f"conf/{group}/{name}.yaml: its defaults list loops through {' -> '.join(seen)}")
    raw = OmegaConf.load(path)
    defaults = list(raw.pop("defaults", None) or ["_self_"])
    if "_self_" not in defaults:  # Hydra 1.1+: _self_ last unless placed
        defaults.append("_self_")
    out = OmegaConf.create({})
    for entry in defaults:
        if entry == "_self_":
            out = OmegaConf.merge(out, raw)
        elif isinstance(entry, str) and "/" not in entry and ":" not in entry and "=" not in entry:
            out = OmegaConf.merge(out, _compose(group, entry, (*seen, name)))
        else:
            raise ConfigError(f"conf/{group}/{name}.yaml: defaults entry {entry!r} names another group or an "
                              "override; only options of the same group and _self_ are read outside Hydra")
    return out  # type: ignore[return-value]
