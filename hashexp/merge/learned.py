"""Hashed merging with a learned hash per site (``hashing=learnable``).

Same pipeline as :class:`~hashexp.merge.hashed.HashCompressor` (fingerprints -> clsh
candidates -> exact cosine -> verified groups -> merge); only the hash family differs. Each
site keeps one :class:`~hashexp.lsh.learnable.LearnableSimHash` across rehashes (MONGOOSE,
ICLR 2021: learn the LSH from the data it indexes), and before each rehash it is trained for
a few Adam steps so that pairs of neurons that behave alike collide and random dissimilar
pairs do not. When the site's fan-in changes (the previous site was merged), its hash is
re-created from a fresh seed and trained again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hashexp.errors import ConfigError
from hashexp.merge.cosine import WEIGHTS_THRESHOLD
from hashexp.merge.hashed import HashCompressor
from hashexp.merge.sites import MergeSite
from hashexp.utils.seeding import EVENT_MIX, SEED_MIX, VERSION_MIX, derive_seed


def pair_threshold(threshold: float) -> float:
    """Least cosine of a pair that can pass member-to-representative verification at ``threshold``."""
    return 2 * threshold * threshold - 1 if threshold > 0 else -1.0


class LearnableHashCompressor(HashCompressor):
    """:class:`HashCompressor` whose per-site hyperplanes are trained before each rehash.

    Args:
        positives: ``cosine`` (pairs whose weight vectors point alike) or ``activation`` (pairs
            whose per-batch activation sums correlate over the recent window; cosine when the
            window holds fewer than 3 batches).
        pos_threshold: positives have similarity >= this (None: the cosine at which a pair passes
            the compressor's prefilter, ``2 threshold^2 - 1``: two equal members at cosine c sit
            at sqrt((1 + c) / 2) from their representative).
        neg_threshold: negatives are random pairs with similarity < this (None: below the least
            similar positive, i.e. any pair less alike than all of the top pairs).
        max_pos, max_neg: at most this many positive (most similar first) / negative pairs.
        pos_weight, neg_weight: loss weights of the two terms.
        temperature: slope of the tanh relaxation of the sign bits.
        updates: the most Adam steps per rehash (0: the hash is never trained, i.e. persistent SimHash).
        lr: Adam learning rate.
        stop_recall: stop a rehash's training once this fraction of the positive pairs collide
            under the hard bits (None: always ``updates`` steps). At 1.0 with 10 steps at lr 0.2 on
            2048 negatives: recall 1.0 on the four cases of benchmarks/bench_learnable.md after 2-8
            steps; a fixed 6 steps lose 0.0015 on planted clusters.
        other arguments: see :class:`HashCompressor`.
    """

    name = "learnable"

    def __init__(self, positives: str = "cosine", pos_threshold: float | None = None,
                 neg_threshold: float | None = None, max_pos: int = 2048, max_neg: int = 2048,
                 pos_weight: float = 1.0, neg_weight: float = 1.0, temperature: float = 2.0,
                 updates: int = 10, lr: float = 0.2, stop_recall: float | None = 1.0, **kw) -> None:
        super().__init__(**kw)
        if positives not in ("cosine", "activation"):
            raise ConfigError(f"hashing.positives={positives!r}; choose cosine or activation")
        for k, v in (("pos_threshold", pos_threshold), ("neg_threshold", neg_threshold)):
            if v is not None and not (-1.0 <= float(v) <= 1.0):
                raise ConfigError(f"hashing.{k} must be in [-1, 1] or null, got {v}")
        if stop_recall is not None and not 0.0 < float(stop_recall) <= 1.0:
            raise ConfigError(f"hashing.stop_recall={stop_recall}; use a fraction in (0, 1] (1.0: stop once every "
                              "positive pair collides) or null (always run hashing.updates steps)")
        if int(updates) < 0 or float(lr) <= 0 or float(temperature) <= 0:
            raise ConfigError(f"hashing.updates must be >= 0, lr and temperature > 0; got {updates}, {lr}, {temperature}")
        if int(max_pos) < 1 or int(max_neg) < 1:
            raise ConfigError(f"hashing.max_pos and max_neg must be >= 1, got {max_pos}, {max_neg}")
        self.positives = positives
        self.pos_threshold = None if pos_threshold is None else float(pos_threshold)
        self.neg_threshold = None if neg_threshold is None else float(neg_threshold)
        self.max_pos, self.max_neg = int(max_pos), int(max_neg)
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)
        self.temperature, self.updates, self.lr = float(temperature), int(updates), float(lr)
        self.stop_recall = None if stop_recall is None else float(stop_recall)
        self.hashers: dict[str, Any] = {}
        self.created: dict[str, int] = {}
        self.trained: dict[str, int] = {}
        self.train_log: list[dict[str, Any]] = []
        self._stats = None
        self._x: torch.Tensor | None = None
        self._trained_at: dict[str, int] = {}

    # ---------------------------------------------------------------- plumbing
    def compress(self, model, names, stats, optimizer, step: int, dist=None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None, calib=None) -> list[dict[str, Any]]:
        """As :meth:`Compressor.compress`, with the activation statistics at hand for activation positives."""
        self._stats = stats  # activation positives read the per-batch sums
        try:
            return super().compress(model, names, stats, optimizer, step, dist=dist, overrides=overrides,
                                    calib=calib)
        finally:
            self._stats = None

    def candidate_pairs(self, site: MergeSite, index: int, x: torch.Tensor) -> np.ndarray:
        """Candidate pairs from this site's learned hash, trained first on ``x``."""
        self._x = x
        try:
            return super().candidate_pairs(site, index, x)
        finally:
            self._x = None

    def hasher(self, site: MergeSite, index: int, dim: int):
        """The site's persistent hash; a fresh seeded one when the fan-in or K, L changed."""
        from hashexp.lsh.learnable import LearnableSimHash

        h = self.hashers.get(site.name)
        if h is None or h.dim != dim or h.bits != self.bits or h.tables != self.tables:
            n = self.created.get(site.name, 0)
            seed = derive_seed(self.seed, index, n, scale=SEED_MIX, weights=(EVENT_MIX, VERSION_MIX), modulus=2**62)
            h = LearnableSimHash(dim, self.bits, self.tables, seed=seed)
            self.hashers[site.name] = h
            self.created[site.name] = n + 1
        return h

    def make_hasher(self, site: MergeSite, index: int, dim: int):
        """This site's learned hash, re-created when its fan-in changed."""
        h = self.hasher(site, index, dim)
        # trained once per rehash, on the site's neurons (the first merging round); later rounds
        # hash the round's representatives with the same hyperplanes
        if self.updates > 0 and self._trained_at.get(site.name) != self.calls:
            x = self._x if self._x is not None else self.hash_vectors(site).cpu()
            self.train_hasher(site, index, h, x)
            self._trained_at[site.name] = self.calls
        return h

    # ---------------------------------------------------------------- training
    def similarity(self, site: MergeSite, x: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """(N, N) similarity used to mine pairs and which kind it is: the activation correlation, or
        (None, "cosine"): cosine pairs are mined without a Gram (:func:`~hashexp.lsh.learnable.top_cosine_pairs`)."""
        if self.positives == "activation" and self._stats is not None:
            from hashexp.lsh.pairs import activation_correlation

            buf = getattr(self._stats, "buffers", {}).get(site.name)
            if buf and len(buf) >= 3:
                corr = activation_correlation(torch.stack(list(buf)).cpu())
                if corr is not None and corr.shape[0] == x.shape[0]:
                    return corr, "activation"
        return None, "cosine"

    def train_hasher(self, site: MergeSite, index: int, h, x: torch.Tensor) -> dict[str, Any]:
        """A few Adam steps on the site's hash: similar pairs collide, random dissimilar ones do not; the training
        stats."""
        from hashexp.lsh.pairs import random_cosine_pairs, random_pairs, top_cosine_pairs, top_pairs

        t = self.threshold if self.threshold is not None else WEIGHTS_THRESHOLD
        pt = pair_threshold(t) if self.pos_threshold is None else self.pos_threshold
        sim, kind = self.similarity(site, x)
        if kind == "cosine":  # no Gram: the upper triangle in blocks, its short list ranked by exact cosine
            u = x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
            pos, pos_sim = top_cosine_pairs(u, pt, self.max_pos)
        else:
            pos = top_pairs(sim, pt, self.max_pos)
            pos_sim = sim[pos[:, 0], pos[:, 1]]
        if self.neg_threshold is not None:
            nt = self.neg_threshold
        else:  # anything less alike than every positive: the hash should rank the top pairs first
            nt = float(pos_sim.min()) if len(pos) else -2.0
        gen = self._generator(index)
        neg = (random_cosine_pairs(u, nt, self.max_neg, generator=gen) if kind == "cosine"
               else random_pairs(sim, nt, self.max_neg, generator=gen))
        rec = {"site": site.name, "call": self.calls, "positives": int(len(pos)), "negatives": int(len(neg)),
               "similarity": kind}
        if len(pos) == 0:
            rec.update(loss_before=float("nan"), loss_after=float("nan"), updates=0, time_s=0.0)
        else:
            rec.update(h.fit(x, pos, neg, updates=self.updates, lr=self.lr, temperature=self.temperature,
                             pos_weight=self.pos_weight, neg_weight=self.neg_weight, stop_recall=self.stop_recall))
            self.trained[site.name] = self.trained.get(site.name, 0) + int(rec["updates"])
        self.train_log.append(rec)
        return rec

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The base state plus every site's learned hyperplanes."""
        return {**super().state_dict(),
                "hashers": {n: {"projections": h.projections.detach().clone(), "dim": int(h.dim),
                                "bits": int(h.bits), "tables": int(h.tables)} for n, h in self.hashers.items()},
                "created": dict(self.created), "trained": dict(self.trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        from hashexp.lsh.learnable import LearnableSimHash

        super().load_state_dict(state)
        self.created = {k: int(v) for k, v in state.get("created", {}).items()}
        self.trained = {k: int(v) for k, v in state.get("trained", {}).items()}
        self.hashers = {}
        for n, s in state.get("hashers", {}).items():
            h = LearnableSimHash(int(s["dim"]), int(s["bits"]), int(s["tables"]), seed=0)
            with torch.no_grad():
                h.projections.copy_(s["projections"])
            self.hashers[n] = h
