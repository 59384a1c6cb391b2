"""Any torchvision or timm classification model, at random init, adapted to a dataset.

``model=torchvision model.arch=resnet18`` and ``model=timm model.arch=resnet18`` build the
library's model with the dataset's class count (the libraries' own ``num_classes``), then adapt
it to the dataset's images:

- channels: torchvision models take 3-channel images; the first conv is replaced by one with the
  dataset's in-channels (same out-channels, kernel, stride, padding; fresh init). timm takes
  ``in_chans`` itself.
- size: ``min_size`` (e.g. 64 for models whose stride needs it) upsamples smaller images
  bilinearly inside the model (the model becomes ``Resized(min_size, net)``, its layers' paths
  start with ``net.``); ``small_stem=true`` makes the first conv 3x3 stride 1 and drops a
  top-level ``maxpool`` (the usual CIFAR adaptation of ResNets) instead.
- extra constructor arguments of the library's builder go in ``model.kwargs``.

Nothing here knows about merging: the sites are found by tracing (hashexp.merge.discovery), and
a merged model is rebuilt from this config plus its merged widths (hashexp.models.build_model).
No pretrained weights are ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hashexp.errors import ConfigError


class Resized(nn.Module):
    """Upsample images smaller than ``min_size`` (bilinear) before the wrapped network.

    Args:
        min_size: the smallest height/width the network sees.
        net: the network.
    """

    def __init__(self, min_size: int, net: nn.Module) -> None:
        super().__init__()
        self.min_size = int(min_size)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` (bilinear) so its smaller side is at least ``min_size``, then run the wrapped net."""
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            s = self.min_size / min(h, w)
            x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
        return self.net(x)


def _image_shape(input_shape: Sequence[int], family: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(f"model={family} needs image inputs (channels, height, width), got input_shape="
                          f"{tuple(input_shape)}; use model=mlp for flat features")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _first_conv(net: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ConfigError(f"{type(net).__name__} has no Conv2d to adapt to the dataset's channels")


def _set_module(net: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)


def _replace_stem(net: nn.Module, in_channels: int, small_stem: bool) -> None:
    """Replace the first conv: the dataset's in-channels, and 3x3 stride 1 with ``small_stem``."""
    path, conv = _first_conv(net)
    if conv.groups != 1:
        raise ConfigError(f"the first conv {path} of {type(net).__name__} is grouped; cannot adapt its in-channels")
    if conv.in_channels == in_channels and not small_stem:
        return
    kernel, stride, padding = (3, 1, 1) if small_stem else (conv.kernel_size, conv.stride, conv.padding)
    new = nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, dilation=1 if small_stem else conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    _set_module(net, path, new)
    if small_stem and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        net.maxpool = nn.Identity()


def torchvision_model(input_shape: Sequence[int], num_classes: int, arch: str, min_size: int | None = None,
                      small_stem: bool = False, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A torchvision classification model ``arch`` at random init, adapted to the dataset.

    Args:
        input_shape: per-sample ``(channels, height, width)``.
        num_classes: the classifier's out-features.
        arch: a name from ``torchvision.models.list_models(module=torchvision.models)``.
        min_size: upsample smaller images to this size inside the model (None: never).
        small_stem: 3x3 stride-1 first conv and no top-level max-pool (CIFAR-style ResNets).
        kwargs: further arguments of the torchvision builder (e.g. ``{"image_size": 32}`` for ViT).
    """
    import torchvision

    c, h, w = _image_shape(input_shape, "torchvision")
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ConfigError(f"model.arch={arch!r} is not a torchvision classification model; choose one of "
                          f"{', '.join(names)}")
    extra = dict(kwargs or {})
    if arch.startswith("inception") or arch == "googlenet":
        extra.setdefault("aux_logits", False)
        extra.setdefault("init_weights", True)
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=int(num_classes), **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model=torchvision model.arch={arch}: the builder refused model.kwargs={extra}: {e}") from None
    _replace_stem(net, c, small_stem)
    return Resized(min_size, net) if min_size and min(h, w) < int(min_size) else net


def timm_model(input_shape: Sequence[int], num_classes: int, arch: str, min_size: int | None = None,
               kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A timm model ``arch`` at random init (``pretrained=False``) with the dataset's channels and classes.

    Args:
        input_shape: per-sample ``(channels, height, width)``.
        num_classes: the classifier's out-features.
        arch: a name from ``timm.list_models()``.
        min_size: upsample smaller images to this size inside the model (None: never).
        kwargs: further arguments of ``timm.create_model`` (e.g. ``{"img_size": 32}``).
    """
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the optional package timm: pip install 'hashexp[timm]'") from None
    c, h, w = _image_shape(input_shape, "timm")
    if not timm.is_model(arch):
        raise ConfigError(f"model.arch={arch!r} is not a timm model; list them with timm.list_models()")
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=int(num_classes), in_chans=c, **dict(kwargs or {}))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"model=timm model.arch={arch}: create_model refused model.kwargs={dict(kwargs or {})}: {e}") from None
    return Resized(min_size, net) if min_size and min(h, w) < int(min_size) else net
