"""Residual networks whose channels merge: CIFAR ResNet-20/56 and a small-image ResNet-18.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. The CIFAR networks
(Sec. 4.2) have a 3x3 stem and 3 stages of n basic blocks with 16/32/64 channels, depth 6n+2
(n=3: ResNet-20, n=9: ResNet-56). ResNet-18 has 4 stages of 2 basic blocks with 64/128/256/512
channels; for small images its stem is a single 3x3 stride-1 conv without max-pool (the usual
CIFAR adaptation). Shortcuts are option B: a 1x1 conv + BN where the width or stride changes,
the identity otherwise. Convs have no bias (BN follows); global average pool, then Linear.

Merge sites (hashexp.merge.sites), in forward order, as the tracer (hashexp.merge.discovery) finds
them and :meth:`ResNet.site_names` names them:

- ``stream{k}``: the residual stream of stage k. An identity shortcut adds a block's input to
  its output channel by channel, so merging channel j into i on the output forces the same merge
  on the input: every tensor that writes or reads the stream is one site. Producers are the stem
  conv+BN (stream1) or the 1x1 shortcut conv+BN of the block that opens the stream, plus every
  block's conv2+bn2 in the stage; consumers are the conv1 of every block that reads the stream,
  the next stage's shortcut conv, and the final Linear for the last stream.
- ``layer{k}.{b}.inner``: the width between conv1 and conv2 of block b of stage k; producer
  conv1+bn1, consumer conv2, tap the block's own ``act1`` ReLU.

Why streams merge exactly: if channel j is k_j times channel i (k_j > 0) in *every* producer of
a stream (BN-folded filter and bias), then by induction over the blocks the stream itself
satisfies z_j = k_j z_i: the stem or shortcut starts it that way, and each block adds
conv2 output (ratio k_j) to the identity path (ratio k_j, the stream so far), and ReLU keeps
positive ratios. The surgery merges the concatenated producer vectors, so every producer gets
the same representative scale and the identity path stays consistent. A ratio that differs
between producers would break the identity path; the site's neuron vectors then disagree in
direction, which is exactly what the hasher measures.

Activation tap of a stream: one ``nn.ReLU`` module per stream, shared by the stem (stream1) and
by the post-add ReLU of every block of that stream. A forward hook on it fires once per block,
so accumulated activation mass is summed over every state of the stream (every tensor its
consumers read), not only the last one. ReLU has no state, so sharing it changes nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.sites import HasMergeSites


@dataclass(frozen=True)
class Stage:
    """One stage: ``blocks`` basic blocks of nominal ``width``; the first block has ``stride``."""

    width: int
    blocks: int
    stride: int


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016, Fig. 2 left).

    Args:
        in_planes: width of the stream the block reads.
        mid_planes: block-internal width (its own merge site).
        out_planes: width of the stream the block writes.
        stride: stride of conv1 and of the projection shortcut.
        project: option B shortcut (1x1 conv + BN); identity otherwise, which needs
            ``in_planes == out_planes`` and ``stride == 1``.
        act_out: the post-add ReLU, shared by all blocks of one stream (the stream's tap).
    """

    def __init__(self, in_planes: int, mid_planes: int, out_planes: int, stride: int, project: bool,
                 act_out: nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        # a module of its own (not F.relu) so that a hook sees exactly this block's inner activation
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_planes, out_planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        if project:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))
        else:
            if in_planes != out_planes or stride != 1:
                raise ValueError(f"identity shortcut needs equal widths and stride 1, got "
                                 f"{in_planes}->{out_planes} stride {stride}")
            self.shortcut = nn.Identity()
        self.act_out = act_out
        self.project = project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two 3x3 convs with BN, added to the (projected) residual stream."""
        h = self.act1(self.bn1(self.conv1(x)))
        # not in place: the tap (act_out of the previous block) may hold x for the hook
        return self.act_out(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module, HasMergeSites):
    """A basic-block ResNet for small images, with a stream site per stage and a site per block.

    Stage 1 keeps the stem's width and resolution (identity shortcuts throughout); every later
    stage opens a new stream with a projection shortcut on its first block.

    Args:
        input_shape: per-sample ``(C, H, W)``; C sets the stem's input channels.
        num_classes: output width of the final Linear (never merged).
        stages: nominal ``(width, blocks, stride)`` of each stage; stage 1 must have stride 1.
        site_widths: per-site widths (``{"stream1": 12, "layer1.0.inner": 9, ...}``) overriding
            the nominal ones; used to rebuild a merged model from model.pt.
        width_mult: scales every nominal width (rounded, at least 1).
        name: architecture name (recorded in configs; no effect on the network).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, stages: Sequence[Stage | Sequence[int]],
                 site_widths: Mapping[str, int] | None = None, width_mult: float = 1.0,
                 name: str = "resnet") -> None:
        super().__init__()
        input_shape = tuple(int(d) for d in ([input_shape] if isinstance(input_shape, int) else input_shape))
        if len(input_shape) != 3:
            raise ConfigError(f"model {name}: needs image inputs of shape (C, H, W), got {input_shape}; "
                              f"use model=mlp for flat features")
        stages = [s if isinstance(s, Stage) else Stage(*map(int, s)) for s in stages]
        if not stages or any(s.blocks < 1 or s.stride < 1 or s.width < 1 for s in stages):
            raise ConfigError(f"model {name}: stages must have positive width, blocks and stride, got {stages}")
        if stages[0].stride != 1:
            raise ConfigError(f"model {name}: the first stage shares the stem's stream and must have stride 1")
        if not width_mult > 0:
            raise ConfigError(f"model.width_mult must be positive, got {width_mult}")
        self.arch = name
        self.input_shape = input_shape
        self.num_classes = int(num_classes)
        self.stage_specs = stages

        widths = self._nominal_widths(width_mult)
        if site_widths:
            unknown = sorted(set(site_widths) - set(widths))
            if unknown:
                raise ConfigError(f"model {name}: unknown sites {unknown} in site_widths; "
                                  f"this model has {list(widths)}")
            widths.update({k: int(v) for k, v in site_widths.items()})
        bad = {k: v for k, v in widths.items() if v < 1}
        if bad:
            raise ConfigError(f"model {name}: site widths must be positive integers, got {bad}")

        self.conv1 = nn.Conv2d(input_shape[0], widths["stream1"], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths["stream1"])
        # one post-add ReLU per stream; the stem's ReLU is stream1's (see module docstring)
        self.stream_acts = nn.ModuleList(nn.ReLU() for _ in stages)
        for k, st in enumerate(stages):
            blocks = []
            for b in range(st.blocks):
                opens = k > 0 and b == 0
                blocks.append(BasicBlock(
                    in_planes=widths[f"stream{k if opens else k + 1}"],
                    mid_planes=widths[f"layer{k + 1}.{b}.inner"],
                    out_planes=widths[f"stream{k + 1}"],
                    stride=st.stride if b == 0 else 1,
                    project=opens,
                    act_out=self.stream_acts[k]))
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[f"stream{len(stages)}"], self.num_classes)
        self._init_weights()

    def _nominal_widths(self, width_mult: float) -> dict[str, int]:
        widths: dict[str, int] = {}
        for k, st in enumerate(self.stage_specs):
            w = max(1, int(round(st.width * width_mult)))
            widths[f"stream{k + 1}"] = w
            for b in range(st.blocks):
                widths[f"layer{k + 1}.{b}.inner"] = w
        return widths

    def _init_weights(self) -> None:
        # He initialisation (fan_out, as torchvision). BN gammas stay 1, not zero-initialised:
        # a zero gamma makes the folded producer vector zero, which has no direction to hash.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The residual stages, in order."""
        return [getattr(self, f"layer{k + 1}") for k in range(len(self.stage_specs))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        x = self.stream_acts[0](self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean(dim=(2, 3)))

    def site_names(self) -> dict[str, str]:
        """Names of the traced sites by first producer: ``stream{k}`` (opened by the stem or a
        stage's shortcut conv) and ``layer{k}.{b}.inner`` (a block's conv1)."""
        names = {"conv1": "stream1"}
        for k, stage in enumerate(self.stages):
            if k > 0:
                names[f"layer{k + 1}.0.shortcut.0"] = f"stream{k + 1}"
            for b in range(len(stage)):
                names[f"layer{k + 1}.{b}.conv1"] = f"layer{k + 1}.{b}.inner"
        return names


def cifar_stages(depth: int) -> list[Stage]:
    """He et al. 2016 Sec. 4.2: depth 6n+2, 3 stages of n blocks, 16/32/64 channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return [Stage(16, n, 1), Stage(32, n, 2), Stage(64, n, 2)]


class CifarResNet(ResNet):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, Sec. 4.2) with option-B shortcuts."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20,
                 site_widths: Mapping[str, int] | None = None, width_mult: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(input_shape, num_classes, cifar_stages(depth), site_widths=site_widths,
                         width_mult=width_mult, name=name or f"resnet{depth}")


class ResNet20(CifarResNet):
    """ResNet-20: 3 stages x 3 blocks, 16/32/64 channels, ~0.27M parameters."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, site_widths: Mapping[str, int] | None = None,
                 width_mult: float = 1.0, name: str = "resnet20") -> None:
        super().__init__(input_shape, num_classes, depth=20, site_widths=site_widths, width_mult=width_mult,
                         name=name)


class ResNet56(CifarResNet):
    """ResNet-56: 3 stages x 9 blocks, 16/32/64 channels, ~0.85M parameters."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, site_widths: Mapping[str, int] | None = None,
                 width_mult: float = 1.0, name: str = "resnet56") -> None:
        super().__init__(input_shape, num_classes, depth=56, site_widths=site_widths, width_mult=width_mult,
                         name=name)


class ResNet18(ResNet):
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, 4 stages x 2 blocks, 64..512."""

    STAGES = (Stage(64, 2, 1), Stage(128, 2, 2), Stage(256, 2, 2), Stage(512, 2, 2))

    def __init__(self, input_shape: Sequence[int], num_classes: int, site_widths: Mapping[str, int] | None = None,
                 width_mult: float = 1.0, name: str = "resnet18") -> None:
        super().__init__(input_shape, num_classes, self.STAGES, site_widths=site_widths, width_mult=width_mult,
                         name=name)

