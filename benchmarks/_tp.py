"""Torch-Pruning (Fang et al., DepGraph, CVPR 2023) as the peer baseline of the any-model benchmarks.

``tp_prune`` prunes a copy of a model with Torch-Pruning's MagnitudePruner (group L1 importance,
its DependencyGraph couples the layers) at given per-layer ratios, so that it reaches the same
widths as hashexp; nothing is refit (Torch-Pruning's pruners do not compensate).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def tp_prune(model: nn.Module, example: torch.Tensor, ratios: dict[str, float], ignore_rest: bool = True,
             global_ratio: float = 0.0) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning: ``ratios`` maps a module path to the share of its
    out-channels removed; every other Linear/Conv is ignored (``ignore_rest``) or pruned at ``global_ratio``."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    ratio_dict = {mods[n]: r for n, r in ratios.items()}
    layers = [(n, mod) for n, mod in mods.items() if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd))]
    # the classifier (last layer) never loses outputs; with ignore_rest neither does any layer not in ratios
    ignored = [mod for n, mod in layers if (ignore_rest and n not in ratios) or mod is layers[-1][1]]
    pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=global_ratio, pruning_ratio_dict=ratio_dict,
                                       ignored_layers=ignored)
    pruner.step()
    return m
