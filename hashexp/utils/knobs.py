"""Type check of every config knob before anything is built: one line naming knob, value and type.

A value of the wrong type (``hashing.max_error=abc``) would otherwise fail deep inside a
constructor, or as Hydra's bare ``Error in call to target ...``. The expected type of a knob is
the annotation of the parameter it becomes: of the node's ``_target_`` (its ``__init__`` and
those of its base classes, which take the rest through ``**kw``), of a nested ``_target_`` node
(``trainer.optimizer``), or of the dataclass / declared keys of a nested mapping knob
(``hashing.pull``, ``dataset.augment``, ``trainer.checkpoint``, ``trainer.logging``). A knob
without an annotation is not checked here; its constructor still validates it.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hashexp.errors import ConfigError

GROUPS = ("dataset", "model", "hashing", "schedule", "trainer", "logger")
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# keys the app reads itself, not the target: a group's label, the model's default error budget
_APP_KEYS = {"name": str, "merge_budget": float | None}
# groups whose keys are split between the target and another class (hashing.window, calib_samples,
# bn_recalib_batches, pull configure the Rehasher, see hashexp.merge.rehasher.build_rehasher)
_ALSO = {"hashing": "hashexp.merge.rehasher.Rehasher"}


def _nested_types() -> dict[str, dict[str, Any]]:
    """Nested mapping knobs (no ``_target_`` of their own): their keys' types."""
    from hashexp.data.augment import Augment
    from hashexp.merge.pull import PullConfig

    return {
        "pull": typing.get_type_hints(PullConfig),
        "augment": typing.get_type_hints(Augment),
        "checkpoint": {"enabled": bool, "every_steps": int | None, "resume": str | None},
        "logging": {"every": int, "progress": str},
    }


def check_knob_types(cfg: DictConfig) -> None:
    """Check every group of a composed run config (dataset, model, hashing, ...); raise ConfigError."""
    for group in GROUPS:
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if isinstance(node, DictConfig):
            check_node(node, group)


def check_node(node: DictConfig | dict, path: str) -> None:
    """Check the keys of one ``_target_`` node (recursively); ``path`` names it in messages."""
    for knob, value, expected in iter_knobs(node, path):
        if expected is not None and value is not None and not fits(value, expected):
            # null is always let through: the default, or a value the app fills in (seed)
            raise ConfigError(f"{knob}={_show(value)} has the wrong type: expected {describe(expected)}")


def iter_knobs(node: DictConfig | dict, path: str):
    """Yield ``(knob, value, expected type or None)`` for every key of a ``_target_`` node, nested
    ``_target_`` nodes and nested mapping knobs included (their own keys, not the mapping)."""
    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except Exception:  # an interpolation that does not resolve: instantiation reports it
            return
    target = node.get("_target_")
    hints = _hints(target) if isinstance(target, str) else None
    if hints is None:
        return
    if path in _ALSO:
        hints = {**(_hints(_ALSO[path]) or {}), **hints}
    nested = _nested_types()
    for key, value in node.items():
        if key in _HYDRA_KEYS:
            continue
        knob = f"{path}.{key}"
        if isinstance(value, dict) and "_target_" in value:
            yield from iter_knobs(value, knob)
        elif key in nested:
            hint = hints.get(key)
            yield knob, value, (dict[str, Any] | None) if hint in (None, Any) else hint
            for sub, v in (value.items() if isinstance(value, dict) else ()):
                yield f"{knob}.{sub}", v, nested[key].get(sub)
        else:
            yield knob, value, hints.get(key)


def _hints(target: str) -> dict[str, Any] | None:
    """Parameter annotations of ``target`` and, for a class, of every ``__init__`` in its MRO."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # not importable: instantiation says so
        return None
    funcs = [c.__dict__["__init__"] for c in reversed(obj.__mro__) if "__init__" in c.__dict__
             and c is not object] if inspect.isclass(obj) else [obj]
    hints: dict[str, Any] = {}
    for f in funcs:  # subclasses last: their annotations win
        try:
            hints.update(typing.get_type_hints(f))
        except Exception:
            continue
    hints.pop("return", None)
    return {**_APP_KEYS, **hints}


def fits(value: Any, expected: Any) -> bool:
    """Whether a config value (None, bool, int, float, str, list, dict) can be an ``expected``."""
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    if expected is None or expected is type(None):
        return value is None
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        # members a config cannot spell (float | Tensor): only the spellable ones count
        spellable = [a for a in args if describe(a) != "anything"]
        return not spellable or any(fits(value, a) for a in spellable)
    if origin is typing.Literal:
        return value in args
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    container = origin or expected
    if container in (list, tuple, cabc.Sequence, cabc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if container in (dict, cabc.Mapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(fits(v, args[1]) for v in value.values())
    return True  # a class a config cannot build (Tensor, Module, Callable): not for this check


def describe(expected: Any) -> str:
    """A type in the words of a config file: ``a number or null``, ``a list of integers``."""
    if expected is None or expected is type(None):
        return "null"
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        words = [describe(a) for a in args if describe(a) != "anything"]
        return " or ".join(dict.fromkeys(words))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if expected in names:
        return names[expected]
    container = origin or expected
    if container in (list, tuple, cabc.Sequence, cabc.Iterable):
        return f"a list of {_plural(describe(args[0]))}" if args and args[-1] is not Ellipsis else "a list"
    if container in (dict, cabc.Mapping):
        return f"a mapping of {_plural(describe(args[1]))}" if len(args) == 2 and args[1] is not Any else "a mapping"
    return "anything"


def _plural(word: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans"}.get(word, word)


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)
