"""Neuron Merging's scaling matrices (Kim et al., "Neuron Merging: Compensating for Pruned Neurons",
NeurIPS 2020): the plain rule for a layer followed by its activation, and the Conv-BN rule for a
layer followed by BatchNorm and then its activation.

Both keep the ``keep`` neurons of largest L1 norm and fold each pruned neuron n into one survivor
m through the scaling matrix Z (width x keep): Z[m, m] = 1 and Z[n, m] = z_nm, absorbed by the next
layer's input columns (W'_{l+1} = W_{l+1} Z). A survivor's producer rows, and its BatchNorm, stay
as they were.

Plain rule (paper Sec. 3, data-free decomposition): rows p = [w; b] (BN-folded on a conv+BN site
with ``bn_rule=folded``), survivor m* = argmax_m cos(p_n, p_m), z = |p_n| / |p_m*| when that
cosine reaches the threshold t, else n is dropped. On Linear sites this is the paper's rule.

Conv-BN rule (the paper's batch-normalization case of its method, Sec. 3). Channel i after BN is
BN_i(x) = gamma_i (W_i * x - mu_i) / sigma_i + beta_i, with sigma_i = sqrt(running_var_i + eps)
(a conv bias b_i enters as mu_i - b_i). If the pruned filter is a rescaled survivor,
W_n = s W_m with s = |W_n| / |W_m| (s > 0 for cos(W_n, W_m) = 1), then

    BN_n = S BN_m + B,   S = s (gamma_n sigma_m) / (gamma_m sigma_n),
                         B = beta_n - S beta_m + (gamma_n / sigma_n) (s mu_m - mu_n),

and ReLU(BN_n) = S ReLU(BN_m) exactly when B = 0 and S > 0. So:

- selection: the L1 norm of each raw filter W_i (BN not part of it, as Li et al. 2017);
- pairing: each pruned n goes to the survivor minimizing
  lambda (1 - cos(W_n, W_m)) + (1 - lambda) d_hat_nm, where d_nm = |B_nm| / S_nm is the bias left
  over in units of the survivor's output and d_hat its min-max normalisation over the survivors;
  survivors with S_nm <= 0 (a flipped sign: no positive rescaling) are not candidates;
- scale: z_nm = S_nm, when cos(W_n, W_m) >= t for the chosen m; otherwise n is dropped.

The stored copies of the paper this was checked against end before its BN subsection, so the
equations above are the paper's merge condition worked out for Conv-BN; the authors' public code
(``bn_rule=code``) differs from them in two places: it uses ``running_var`` itself as sigma (no
square root, no eps), and its scale and bias terms swap the roles of the pruned and the kept
channel (S = s (gamma_m sigma_n) / (gamma_n sigma_m), B = (gamma_m / sigma_m)(s (mu_n -
sigma_n beta_n / gamma_n) - mu_m) + beta_m, d = |B| / S with no sign check). ``code`` reproduces
those formulas for comparison; ``paper`` is the default.
"""

from __future__ import annotations

import torch
from torch import nn

#: how Neuron Merging treats a site whose single producer has a BatchNorm: the Conv-BN rule as the
#: paper's equations give it, as the authors' code computes it, or the plain rule on BN-folded rows
BN_RULES = ("paper", "code", "folded")

_EPS = 1e-12


def neuron_merging_coefficients(p: torch.Tensor, keep: int, threshold: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, consumer coefficients and survivor mask of Neuron Merging for neuron vectors ``p`` (width, D).

    Survivors: the ``keep`` largest L1 norms, labelled 0..keep-1 in index order with m = 1.
    Pruned neuron j: label of its most cosine-similar survivor i and m_j = |p_j| / |p_i| when the
    cosine is >= ``threshold``; label -1 (dropped) otherwise. Computed on the CPU.
    """
    p = p.detach().cpu()
    labels, m, keep_idx, gone = _select(p.abs().sum(1), keep, p.dtype)
    norm = p.norm(dim=1).clamp_min(_EPS)
    u = p / norm[:, None]
    if len(gone):
        cos = u[gone] @ u[keep_idx].T
        best, arg = cos.max(1)
        ok = best >= threshold
        partner = keep_idx[arg]
        labels[gone[ok]] = arg[ok]
        m[gone[ok]] = norm[gone[ok]] / norm[partner[ok]]
    return labels, m, labels_to_survivors(labels, keep_idx)


def bn_statistics(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, float]:
    """(width, 4) float64 rows [gamma, beta, running_mean, running_var] of an eval BatchNorm, and its eps
    (gamma 1 and beta 0 without affine; mean 0 and var 1 without running statistics)."""
    n = bn.num_features
    dev = bn.running_mean.device if bn.running_mean is not None else torch.device("cpu")
    ones, zeros = torch.ones(n, device=dev), torch.zeros(n, device=dev)
    gamma = bn.weight.detach() if bn.affine else ones
    beta = bn.bias.detach() if bn.affine else zeros
    mean = bn.running_mean.detach() if bn.running_mean is not None else zeros
    var = bn.running_var.detach() if bn.running_var is not None else ones
    return torch.stack([gamma, beta, mean, var], 1).double(), float(bn.eps)


def conv_bn_pair_terms(w: torch.Tensor, bias: torch.Tensor, bn: torch.Tensor, eps: float, pruned: torch.Tensor,
                       kept: torch.Tensor, rule: str = "paper") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale S, bias distance d = |B| / S and validity of every (pruned, kept) pair, each (len(pruned), len(kept)).

    ``w`` (width, D) raw filters, ``bias`` (width,) the layer's bias (zeros when it has none),
    ``bn`` the :func:`bn_statistics` rows. ``rule``: ``paper`` or ``code`` (module docstring).
    """
    w, bias = w.double(), bias.double()
    gamma, beta, mean, var = bn.double().unbind(1)
    mean = mean - bias  # BN(W x + b) = gamma (W x - (mu - b)) / sigma + beta
    norm = w.norm(dim=1)
    s = norm[pruned, None] / norm[None, kept].clamp_min(_EPS)
    g_n, b_n, mu_n = gamma[pruned, None], beta[pruned, None], mean[pruned, None]
    g_m, b_m, mu_m = gamma[None, kept], beta[None, kept], mean[None, kept]
    with torch.no_grad():  # a zero gamma or norm gives inf/nan: the pair is then invalid
        if rule == "paper":
            sigma = (var + eps).sqrt()
            sg_n, sg_m = sigma[pruned, None], sigma[None, kept]
            scale = s * (g_n * sg_m) / (g_m * sg_n)
            shift = b_n - scale * b_m + (g_n / sg_n) * (s * mu_m - mu_n)
            d = shift.abs() / scale
            valid = (scale > 0) & torch.isfinite(scale) & torch.isfinite(d)
        elif rule == "code":
            sg_n, sg_m = var[pruned, None], var[None, kept]
            scale = s * (g_m / g_n) * (sg_n / sg_m)
            shift = (g_m / sg_m) * (s * (mu_n - sg_n * b_n / g_n) - mu_m) + b_m
            d = shift.abs() / scale
            valid = torch.isfinite(scale) & torch.isfinite(d)
        else:
            raise ValueError(f"rule={rule!r}; choose paper or code")
    return scale, d, valid


def conv_bn_merging_coefficients(w: torch.Tensor, bias: torch.Tensor, bn: torch.Tensor, eps: float, keep: int,
                                 threshold: float, lam: float, rule: str = "paper"
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, consumer coefficients (the scaling matrix's entries) and survivor mask of Neuron
    Merging's Conv-BN rule (module docstring) for raw filters ``w`` (width, D), the layer's
    ``bias`` (width,) and its BatchNorm rows ``bn`` (:func:`bn_statistics`). Computed on the CPU."""
    w, bias, bn = w.detach().cpu(), bias.detach().cpu(), bn.detach().cpu()
    labels, m, keep_idx, gone = _select(w.abs().sum(1), keep, w.dtype)
    if not len(gone):
        return labels, m, labels_to_survivors(labels, keep_idx)
    u = w.double() / w.double().norm(dim=1).clamp_min(_EPS)[:, None]
    cos = u[gone] @ u[keep_idx].T
    scale, d, valid = conv_bn_pair_terms(w, bias, bn, eps, gone, keep_idx, rule)
    lo = torch.where(valid, d, torch.inf).min(1, keepdim=True).values
    hi = torch.where(valid, d, -torch.inf).max(1, keepdim=True).values
    span = hi - lo
    d_hat = torch.where(span > 0, (d - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(d))
    score = torch.where(valid, lam * (1.0 - cos) + (1.0 - lam) * d_hat, torch.inf)
    best, arg = score.min(1)
    ok = torch.isfinite(best) & (cos.gather(1, arg[:, None])[:, 0] >= threshold)
    labels[gone[ok]] = arg[ok]
    m[gone[ok]] = scale.gather(1, arg[:, None])[:, 0][ok].to(m.dtype)
    return labels, m, labels_to_survivors(labels, keep_idx)


def _select(score: torch.Tensor, keep: int, dtype: torch.dtype):
    """The ``keep`` largest scores (in index order) labelled 0..keep-1 with m = 1; the rest -1, m = 0."""
    width = score.shape[0]
    keep_idx = torch.topk(score, keep).indices.sort().values
    labels = torch.full((width,), -1, dtype=torch.long)
    labels[keep_idx] = torch.arange(keep)
    m = torch.zeros(width, dtype=dtype)
    m[keep_idx] = 1.0
    return labels, m, keep_idx, (labels < 0).nonzero().flatten()


def labels_to_survivors(labels: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(width,) bool mask of the survivors ``keep_idx``."""
    survivor = torch.zeros(labels.shape[0], dtype=torch.bool)
    survivor[keep_idx] = True
    return survivor

