"""How far a site's neurons moved, and how redundant they are: cheap measurements for drift schedules.

Per site, two numbers (:meth:`DriftMeter.measure`):

* bit flips: the fraction of SimHash bits (``bits`` fixed random hyperplanes per site, drawn at
  the first look, at the site's last rehash, or when its width or fan-in changed) whose sign
  differs from the codes taken then: an angle-drift estimate, a true Hamming count (popcount of
  XOR) over packed uint64 codes;
* partner fraction: the share of a random sample of ``sample`` neurons whose exact cosine to some
  other neuron of the site is at least ``threshold`` (a near-duplicate), from one
  (sample x width) matmul. (Proposing partners by Hamming distance of the codes and checking only
  those was measured slower on CPU: gathering the candidate rows costs more than the dense BLAS
  product it saves.)

The meter measures; :class:`hashexp.schedules.drift.DriftSchedule` decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hashexp.merge.sites import MergeSite
from hashexp.utils.seeding import EVENT_MIX, SEED_MIX, VERSION_MIX, derive_seed


class DriftMeter:
    """Reference SimHash codes per site and the two drift measurements against them.

    Args:
        bits: hyperplanes per site for the bit-flip codes (1..64, one packed word per neuron).
        sample: neurons sampled for the partner estimate (all when the site is smaller).
        threshold: two neurons are partners at cosine >= this.
        seed: seeds the hyperplanes and the samples.
    """

    def __init__(self, bits: int = 64, sample: int = 128, threshold: float = 0.7, seed: int = 0) -> None:
        self.bits, self.sample, self.threshold, self.seed = int(bits), int(sample), float(threshold), int(seed)
        self.refs: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}

    def reference(self, site: MergeSite, index: int, x: torch.Tensor | None = None) -> dict[str, Any]:
        """Fresh hyperplanes for this site's fan-in and the codes of its neurons now."""
        from hashexp.lsh import SimHash

        if x is None:
            x = site.neuron_vectors().detach().cpu()
        v = self.versions.get(site.name, 0)
        self.versions[site.name] = v + 1
        seed = derive_seed(self.seed, index, v, scale=SEED_MIX, weights=(EVENT_MIX, VERSION_MIX), modulus=2**62)
        h = SimHash(x.shape[1], self.bits, 1, seed=seed)
        ref = {"hasher": h, "codes": h.fingerprint(x)[:, 0].copy(), "dim": int(x.shape[1]), "width": int(x.shape[0])}
        self.refs[site.name] = ref
        return ref

    def stale(self, name: str, x: torch.Tensor) -> bool:
        """True when ``name`` has no reference, or its width or fan-in changed since it was taken."""
        ref = self.refs.get(name)
        return ref is None or ref["width"] != x.shape[0] or ref["dim"] != x.shape[1]

    def partner_frac(self, x: torch.Tensor, index: int, step: int) -> float:
        """Share of (sampled) neurons with a partner at cosine >= ``threshold``."""
        n = x.shape[0]
        if n < 2:
            return 0.0
        if n <= self.sample:
            idx = torch.arange(n)
        else:
            g = torch.Generator().manual_seed(derive_seed(self.seed, step, index, scale=SEED_MIX, weights=(31, 1),
                                                         modulus=2**62))
            idx = torch.randperm(n, generator=g)[: self.sample]
        norms = x.norm(dim=1).clamp_min(1e-12)
        cos = (x[idx] @ x.T) / (norms[idx][:, None] * norms[None, :])
        cos[torch.arange(len(idx)), idx] = -2.0  # a neuron is not its own partner
        return float((cos.max(dim=1).values >= self.threshold).float().mean())

    def measure(self, site: MergeSite, index: int, step: int) -> tuple[float, float]:
        """(bit-flip fraction since the site's reference codes, estimated partner fraction)."""
        x = site.neuron_vectors().detach().cpu()
        if self.stale(site.name, x):
            self.reference(site, index, x)  # new fan-in or width: drift counts from now
            flip = 0.0
        else:
            ref = self.refs[site.name]
            codes = ref["hasher"].fingerprint(x)[:, 0]
            flips = int(np.bitwise_count(np.bitwise_xor(codes, ref["codes"])).sum())
            flip = flips / float(x.shape[0] * self.bits)
        return flip, self.partner_frac(x, index, step)

    def state_dict(self) -> dict[str, Any]:
        """Per site the reference projections and codes, and each site's hasher version."""
        refs = {n: {"projections": r["hasher"].projections.detach().clone(),
                    "codes": torch.from_numpy(r["codes"].view(np.int64).copy()),
                    "dim": r["dim"], "width": r["width"]} for n, r in self.refs.items()}
        return {"versions": dict(self.versions), "refs": refs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        from hashexp.lsh import SimHash

        self.versions = {k: int(v) for k, v in state["versions"].items()}
        self.refs = {}
        for n, r in state["refs"].items():
            h = SimHash(int(r["dim"]), self.bits, 1, seed=0)
            with torch.no_grad():
                h.projections.copy_(r["projections"])
            self.refs[n] = {"hasher": h, "codes": r["codes"].numpy().view(np.uint64).copy(),
                            "dim": int(r["dim"]), "width": int(r["width"])}
