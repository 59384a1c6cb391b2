"""Model registry: build from config, save to and rebuild from model.pt.

Every model takes ``input_shape``, ``num_classes`` and ``site_widths`` and declares its merge
sites, so a compressed model can be rebuilt from its widths alone.
"""

from __future__ import annotations

import inspect

import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hashexp.errors import ConfigError, DataError
from hashexp.utils.io import torch_save_atomic


def build_model(cfg: DictConfig | Mapping, input_shape, num_classes: int,
                site_widths: Mapping[str, int] | None = None) -> nn.Module:
    """Instantiate ``cfg._target_`` with the dataset's input shape and class count."""
    kwargs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    target = kwargs.pop("_target_", None)
    kwargs.pop("merge_budget", None)  # read by the hashing config (hashing.max_error), not the model
    if target is None:
        raise ConfigError("model config has no _target_; pick one with model=mlp or model=resnet20")
    try:
        cls = get_class(target)
    except Exception as e:  # hydra raises ImportError / ValueError variants
        raise ConfigError(f"model._target_={target!r} cannot be imported: {e}") from None
    if "name" in kwargs and "name" not in inspect.signature(cls).parameters:
        kwargs.pop("name")  # the config's label (run dirs, tables), for a model that does not use it
    model = cls(input_shape=tuple(input_shape), num_classes=int(num_classes), site_widths=site_widths, **kwargs)
    model._hashexp_spec = {"target": target, "kwargs": kwargs, "input_shape": list(input_shape),
                           "num_classes": int(num_classes)}
    return model


def model_payload(model: nn.Module) -> dict[str, Any]:
    """What model.pt holds: weights plus what is needed to rebuild (target, kwargs, widths)."""
    spec = getattr(model, "_hashexp_spec", None)
    if spec is None:
        raise ValueError("model was not built with build_model(); cannot record how to rebuild it")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": "hashexp.model/1", **spec, "widths": dict(model.widths()), "state_dict": state}


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write model.pt atomically (temp file, fsync, rename)."""
    torch_save_atomic(model_payload(model), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a (possibly merged) model from model.pt; ``torch.load(weights_only=True)`` safe."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"model file {path} does not exist; pass the model.pt of a finished run")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise DataError(f"model file {path} is not a readable hashexp model.pt ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != "hashexp.model/1":
        raise DataError(f"model file {path} is not a hashexp model.pt (missing format tag)")
    model = build_model({"_target_": payload["target"], **payload["kwargs"]}, payload["input_shape"],
                        payload["num_classes"], site_widths=payload["widths"])
    model.load_state_dict(payload["state_dict"])
    return model
