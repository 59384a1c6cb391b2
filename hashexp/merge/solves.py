"""The numerics of the merge's least squares: float32 where the ridge bounds the conditioning, and
the consumers' output energy read from the calibration pass instead of recomputed.

Every solve of the merge (the consumers' refit :func:`hashexp.merge.calibration.lsq_map`, the
exact removal cost :func:`hashexp.merge.order.removal_cost`) factors a ridged calibration Gram
G + Lambda with Lambda_jj = ridge * G_jj (plus a 1e-12 floor for dead neurons). Scaled to a unit
diagonal it is G' + ridge / (1 + ridge) I with trace k, so its condition number is at most
k (1 + ridge) / ridge; Cholesky's backward error does not depend on that diagonal scaling (van
der Sluis), so the bound holds for the unscaled matrix too. While the bound times float32's unit
roundoff stays below :data:`MAX_GROWTH`, float32 factors and solves it: at the default ridge
1e-3 that is up to 2095 features. The directions it gets wrong are those where the ridge, not the
data, decides the solution, which the consumers' outputs do not see: on the fmnist_mlp2048 refits
(1024 rows, 389-1178 survivors) the refit's output error agrees with float64's to 6 digits
(tests/test_solves.py checks a stated tolerance). Small problems (under :data:`MIN_FLOAT32`
features) cost nothing either way and stay in float64, so exact cases stay exact to 1e-12.

Every removal order divides its costs by the consumers' centred output energy |X_c W^T|^2, which
costs rows * width * outputs (as much as the whole bucketed order for a 2048-wide consumer). The
calibration pass has already recorded those outputs: :func:`consumer_energy` uses them where they
provably pair with the inputs row by row.
"""

from __future__ import annotations

import weakref

import torch

#: solves with fewer features than this stay in float64 (they are cheap, and planted cases stay exact)
MIN_FLOAT32 = 256
#: the largest conditioning bound * float32 unit roundoff for which float32 is used
MAX_GROWTH = 0.125
_U32 = 2.0 ** -24


def solve_dtype(k: int, ridge: float) -> torch.dtype:
    """float32 for a ridged Gram of ``k`` features whose conditioning bound allows it, else float64."""
    ridge = float(ridge)
    if k < MIN_FLOAT32 or ridge <= 0.0:
        return torch.float64
    return torch.float32 if k * (1.0 + ridge) / ridge * _U32 <= MAX_GROWTH else torch.float64


def spd_factor(a: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of a symmetric positive definite ``a`` (its dtype), or None where it fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    return None if bool(info != 0) else chol


def spd_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """a^-1 rhs for a symmetric positive definite ``a``: Cholesky in the inputs' dtype; a float32
    factorization that fails is redone in float64, and a float64 one that fails (numerically
    indefinite: degenerate features) falls back to LU. Returns the inputs' dtype."""
    chol = spd_factor(a)
    if chol is not None:
        return torch.cholesky_solve(rhs, chol)
    if a.dtype != torch.float64:
        return spd_solve(a.double(), rhs.double()).to(a.dtype)
    return torch.linalg.solve(a, rhs)


#: rows on which :func:`consumer_energy` checks that the captured outputs pair with the inputs
PAIR_ROWS = 16


def consumer_energy(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None = None,
                    gram: torch.Tensor | None = None) -> float:
    """|X_c W^T|^2: a consumer's centred output energy on its calibration rows ``x`` (rows, width).

    ``y`` (rows, out): the outputs the calibration pass recorded. A plain Linear consumer's
    centred outputs are exactly X_c W^T (the bias cancels), so where :data:`PAIR_ROWS` rows spread
    over the capture equal X_c W^T on those rows (to float32 rounding) the energy is read from
    ``y`` (rows * out instead of rows * width * out). Anything else (a conv's weight rows are
    taps, sampled rows pair differently, a consumer that also reads other channels, rows taken
    under other weights) fails the check or the shapes and is computed from ``x`` and ``w``:
    as tr(W G W^T) when the centred Gram ``gram`` is given and the width is at most the rows,
    else as |X_c W^T|^2 in float32.
    """
    rows = x.shape[0]
    mean = x.double().mean(0)
    if y is not None and y.dim() == 2 and y.shape == (rows, w.shape[0]) and rows > PAIR_ROWS:
        yc = y.double() - y.double().mean(0)
        at = torch.linspace(0, rows - 1, PAIR_ROWS, device=x.device).long()
        probe = (x[at].double() - mean) @ w.double().T
        scale = float(yc[at].abs().max().clamp_min(1e-30))
        if float((probe - yc[at]).abs().max()) <= 1e-4 * scale:
            return float((yc * yc).sum())
    if gram is not None and gram.shape[0] <= rows:
        wd = w.double()
        return float(((wd @ gram.double()) * wd).sum())
    return float((((x.double() - mean).float() @ w.float().T).double() ** 2).sum())


#: least-squares maps offered by exact removal costs to the refit of the same capture (newest last)
_OFFERS: list[tuple[weakref.ref, int, torch.Tensor, float, torch.Tensor]] = []
#: at most this many offers are held (a bisection offers one; a site has few consumers)
MAX_OFFERS = 4


def offer_map(x: torch.Tensor, kept: torch.Tensor, ridge: float, t_s: torch.Tensor) -> None:
    """Hold T_S, the map from the survivors ``kept`` of the calibration rows ``x`` to its other
    columns (:func:`hashexp.merge.order.removal_cost`), for :func:`take_map`. Held by a weak
    reference to ``x`` and its version: a capture that is dropped or changed in place never matches."""
    _OFFERS[:] = [o for o in _OFFERS if o[0]() is not None and o[0]() is not x][-(MAX_OFFERS - 1):]
    _OFFERS.append((weakref.ref(x), x._version, kept.clone(), float(ridge), t_s))


def take_map(x: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor | None:
    """The map :func:`offer_map` holds for exactly these rows (same tensor, unchanged), survivors
    and ridge, removed from the offers; None if there is none."""
    _OFFERS[:] = [o for o in _OFFERS if o[0]() is not None]  # a dropped capture's offer goes with it
    for i, (ref, version, k, r, t_s) in enumerate(_OFFERS):
        if ref() is x and version == x._version and r == float(ridge) and torch.equal(k, kept.to(k.device)):
            del _OFFERS[i]
            return t_s
    return None
