"""Sites found by tracing (hashexp.merge.discovery): the hand-declared sites as oracle, hand-built
blocks with planted values, refusals with reasons, and the merge path on discovered sites."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hashexp.errors import ConfigError
from hashexp.merge.discovery import find_sites, shrink_to_widths
from hashexp.merge.discovery.checks import compress_half, noop_error, planted_error, rel
from hashexp.merge.sites import Consumer, MergeSite, Producer, model_sites
from hashexp.models.mlp import MLP
from hashexp.models.resnet import ResNet18, ResNet20, ResNet56


# ------------------------------------------------------------------ the oracle: sites as once declared by hand
def hand_mlp(m: MLP) -> list[MergeSite]:
    return [MergeSite(name=f"fc{i + 1}", producers=[Producer(m.layers[i])], consumers=[Consumer(m.layers[i + 1])],
                      activation=m.activation, tap=m.acts[i]) for i in range(len(m.acts))]


def hand_resnet(m) -> list[MergeSite]:
    stages = m.stages
    sites = []
    for k, stage in enumerate(stages):
        blocks = list(stage)
        if k == 0:
            producers, readers = [Producer(m.conv1, m.bn1)], blocks
        else:
            producers, readers = [Producer(blocks[0].shortcut[0], blocks[0].shortcut[1])], blocks[1:]
        producers += [Producer(b.conv2, b.bn2) for b in blocks]
        consumers = [Consumer(b.conv1) for b in readers]
        if k + 1 < len(stages):
            nxt = stages[k + 1][0]
            consumers += [Consumer(nxt.conv1), Consumer(nxt.shortcut[0])]
        else:
            consumers.append(Consumer(m.fc))
        sites.append(MergeSite(name=f"stream{k + 1}", producers=producers, consumers=consumers, activation="relu",
                               tap=m.stream_acts[k]))
        for b, blk in enumerate(blocks):
            sites.append(MergeSite(name=f"layer{k + 1}.{b}.inner", producers=[Producer(blk.conv1, blk.bn1)],
                                   consumers=[Consumer(blk.conv2)], activation="relu", tap=blk.act1))
    return sites


def _key(s: MergeSite):
    return (s.name, [(p.module, p.norm) for p in s.producers], [c.module for c in s.consumers],
            [(c.before, c.after, c.block) for c in s.consumers], s.members, s.tap, s.activation, s.width, s.gated)


@pytest.mark.parametrize("make,hand", [
    (lambda: MLP((1, 8, 8), 10, (32, 16)), hand_mlp),
    (lambda: MLP((20,), 5, (12, 9, 7), activation="gelu"), hand_mlp),
    (lambda: MLP((20,), 5, (12,), activation="tanh", bias=False), hand_mlp),
    (lambda: ResNet20((3, 16, 16), 10), hand_resnet),
    (lambda: ResNet56((3, 16, 16), 10, width_mult=0.5), hand_resnet),
    (lambda: ResNet18((3, 16, 16), 10, width_mult=0.25), hand_resnet),
])
def test_discovered_equals_hand_declared(make, hand):
    m = make()
    found = model_sites(m)
    assert [_key(s) for s in found] == [_key(s) for s in hand(m)]
    assert all(s.kind in ("plain", "stream") for s in found)


def test_merged_model_keeps_its_sites_and_rebuilds():
    m = ResNet20((3, 16, 16), 10)
    widths = {"stream1": 9, "layer1.0.inner": 5, "stream3": 40}
    shrink_to_widths(m, widths)
    assert {k: m.widths()[k] for k in widths} == widths
    fresh = ResNet20((3, 16, 16), 10, site_widths=m.widths())
    fresh.load_state_dict(m.state_dict())
    assert [s.name for s in model_sites(fresh)] == [s.name for s in model_sites(m)]
