"""Model registry: build from config, save to and rebuild from model.pt.

Every model takes ``input_shape`` and ``num_classes``. Its merge sites are found by tracing
(hashexp.merge.discovery) on an example input remembered on the model, or declared by the model
(``merge_sites()``, the override). A compressed model is rebuilt from its config plus its merged
widths: a model that takes ``site_widths`` builds at those widths itself; any other model is built
at full width and slimmed by ``shrink_to_widths`` (the first ``w`` channels of each site), so
model.pt's state dict loads into it.
"""

from __future__ import annotations

import inspect

import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hashexp.errors import ConfigError, DataError
from hashexp.merge.sites import model_widths
from hashexp.utils.io import torch_save_atomic


def build_model(cfg: DictConfig | Mapping, input_shape, num_classes: int,
                site_widths: Mapping[str, int] | None = None) -> nn.Module:
    """Instantiate ``cfg._target_`` with the dataset's input shape and class count."""
    kwargs = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    target = kwargs.pop("_target_", None)
    kwargs.pop("merge_budget", None)  # read by the hashing config (hashing.max_error), not the model
    # widths of a model built narrow from the start (the scratch baseline: `+model.site_widths={fc1: 100}`)
    cfg_widths = kwargs.pop("site_widths", None)
    site_widths = site_widths if site_widths is not None else cfg_widths
    if target is None:
        raise ConfigError("model config has no _target_; pick one with model=mlp or model=resnet20")
    try:
        cls = get_object(target)
    except Exception as e:  # hydra raises ImportError / ValueError variants
        raise ConfigError(f"model._target_={target!r} cannot be imported: {e}") from None
    if "name" in kwargs and "name" not in inspect.signature(cls).parameters:
        kwargs.pop("name")  # the config's label (run dirs, tables), for a model that does not use it
    native = "site_widths" in inspect.signature(cls).parameters
    model = cls(input_shape=tuple(input_shape), num_classes=int(num_classes),
                **({"site_widths": site_widths} if native else {}), **kwargs)
    if not callable(getattr(model, "merge_sites", None)):  # sites found by tracing on an example input
        from hashexp.merge.discovery import attach_example, shrink_to_widths

        example = example_input(input_shape)
        attach_example(model, example)
        if site_widths and not native:
            shrink_to_widths(model, site_widths, example)
    model._hashexp_spec = {"target": target, "kwargs": kwargs, "input_shape": list(input_shape),
                           "num_classes": int(num_classes)}
    return model


def example_input(input_shape, batch: int = 2) -> torch.Tensor:
    """A fixed random batch of per-sample shape ``input_shape`` (seeded: the same on every rank and run)."""
    return torch.randn((batch, *(int(s) for s in input_shape)), generator=torch.Generator().manual_seed(0))


def model_payload(model: nn.Module) -> dict[str, Any]:
    """What model.pt holds: weights plus what is needed to rebuild (target, kwargs, widths)."""
    spec = getattr(model, "_hashexp_spec", None)
    if spec is None:
        raise ValueError("model was not built with build_model(); cannot record how to rebuild it")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": "hashexp.model/1", **spec, "widths": model_widths(model), "state_dict": state}


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
