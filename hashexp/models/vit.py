"""A small Vision Transformer for small images (Dosovitskiy et al., "An Image is Worth 16x16
Words", ICLR 2021).

Patch embedding (a strided conv), a learned position embedding, ``depth`` pre-norm blocks
(``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) with multi-head self-attention and an MLP of
ratio 4 with GELU, a final LayerNorm and a linear head on the class token (``pool="cls"``) or
on the mean of the patch tokens (``pool="mean"``). Sized to train on Fashion-MNIST on a CPU in
minutes: 28x28 images in 7x7 patches are 16 tokens.

The model declares no merge sites: site discovery (hashexp.merge.discovery) traces it and finds
two per block: the attention heads (``blocks.{i}.attn.qkv``, kind ``heads``: ``heads * head_dim``
features that leave a whole head at a time, its q/k/v rows in the fused ``qkv`` and its columns of
``proj``; :mod:`hashexp.merge.heads`) and the feed-forward width (``blocks.{i}.mlp.fc1`` -> GELU ->
``fc2``). The residual stream (LayerNorm over it) is refused. The attention reads its head count
from the ``qkv`` width, so a merged ViT runs as it is; it is rebuilt from its full-width config
plus the merged widths (:func:`hashexp.models.build_model` shrinks it), and ``head_dim`` with
fewer ``heads`` builds the same attention width from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hashexp.errors import ConfigError


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, scaled dot-product attention, an output projection.

    The number of heads is read from the projection (``qkv.out_features // (3 * head_dim)``), so
    a model whose heads were removed (a merge site of kind ``heads``) runs as it is, and
    ``heads`` is only the initial count.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of ``x`` (batch, tokens, dim) through the fused qkv and output projections."""
        n, t, _ = x.shape
        h = self.qkv.weight.shape[0] // (3 * self.head_dim)
        q, k, v = self.qkv(x).view(n, t, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, h * self.head_dim))


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear: the block's mergeable width (``hidden``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(dropout(act(fc1(x))))``."""
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0, head_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer classifier.

    Args:
        input_shape: per-sample ``(channels, height, width)``; height and width must be
            multiples of ``patch``.
        num_classes: output width.
        dim: token width (the residual stream; never merged).
        depth: number of transformer blocks.
        heads: attention heads; ``dim`` must be a multiple of it unless ``head_dim`` is given.
        patch: patch side in pixels.
        mlp_ratio: feed-forward width as a multiple of ``dim`` (the mergeable sites).
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens).
        dropout: dropout in attention and feed-forward (0 by default).
        head_dim: width of one head (None: ``dim // heads``); with fewer heads than ``dim // head_dim``
            this builds from scratch the attention width a merged ViT ends at.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, dim: int = 64, depth: int = 4, heads: int = 4,
                 patch: int = 7, mlp_ratio: float = 4.0, pool: str = "cls", dropout: float = 0.0,
                 head_dim: int | None = None) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model=vit needs image inputs (channels, height, width), got input_shape={tuple(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        if h % patch or w % patch:
            raise ConfigError(f"model.patch={patch} does not divide the image size {h}x{w}; choose a divisor "
                              f"(e.g. model.patch=7 or 4 for 28x28, 4 or 8 for 32x32)")
        if heads < 1 or (head_dim is not None and head_dim < 1):
            raise ConfigError(f"model.heads={heads} and model.head_dim={head_dim} must be >= 1")
        if head_dim is None and dim % heads:
            raise ConfigError(f"model.dim={dim} is not a multiple of model.heads={heads}; choose a divisor "
                              "or give model.head_dim")
        if pool not in ("cls", "mean"):
            raise ConfigError(f"model.pool={pool!r}; choose cls or mean")
        if depth < 1 or dim < 1 or mlp_ratio <= 0:
            raise ConfigError(f"model=vit needs depth >= 1, dim >= 1 and mlp_ratio > 0 (got {depth}, {dim}, {mlp_ratio})")
        self.pool = pool
        tokens = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(c, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + (pool == "cls"), dim))
        hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden, dropout, head_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``x`` (batch, channels, H, W): patch embedding, blocks, the head on the class token or the mean."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(1))
