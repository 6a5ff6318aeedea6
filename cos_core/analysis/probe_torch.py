"""The batched probe engine: every (cell, fold, label) problem of a `probes.ProbeGrid` fitted at once with torch, in
kernel (dual) form: per cell one Gram matrix of the standardised features, per fold its training block centred on the
training mean, one SPD inverse per (cell, fold) shared by all labels and their control tasks; ridge is then closed form
(plus two refinement steps), logistic regression Boehning's bound-Hessian MM map accelerated by Anderson mixing (the
MM step is the fall-back whenever mixing does not lower the objective). On CUDA the inverse is a recursive block
(Schur complement) inversion made of matrix products. Imports torch and `stats`; never `probes`, which calls it.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from .stats import STD_FLOOR

log = logging.getLogger(__name__)

BLOCK = 128  # below this size the SPD inverse uses Cholesky directly
TOL = 1e-4  # logistic: a problem is done when the MM step would move no training logit by more than this
MEMORY = 10  # logistic: past MM steps Anderson mixing combines
HIDDEN = -1e30  # logistic: the bias of a class absent from a training part (no probability, finite arithmetic)


class NotPositiveDefinite(ArithmeticError):
    """Cholesky failed in the working precision (the caller retries in float64)."""


def spd_inverse(m: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Inverse of symmetric positive definite matrices (..., n, n) by recursive 2x2 block elimination (Schur
    complements), so that nearly all the work is matrix products; Cholesky below `block`."""
    n = m.shape[-1]
    if n <= block:
        return _cholesky_inverse(m)
    k = n // 2
    a, b, d = m[..., :k, :k], m[..., :k, k:], m[..., k:, k:]
    a_inv = spd_inverse(a, block)
    a_inv_b = a_inv @ b  # (..., k, n-k)
    schur = d - b.mT @ a_inv_b
    s_inv = spd_inverse(0.5 * (schur + schur.mT), block)
    del schur
    upper_right = -a_inv_b @ s_inv
    upper_left = a_inv - upper_right @ a_inv_b.mT
    del a_inv, a_inv_b
    top = torch.cat([0.5 * (upper_left + upper_left.mT), upper_right], dim=-1)
    return torch.cat([top, torch.cat([upper_right.mT, s_inv], dim=-1)], dim=-2)


def _cholesky_inverse(m: torch.Tensor) -> torch.Tensor:
    """L^-T L^-1 from batched Cholesky and batched triangular solves (raises NotPositiveDefinite)."""
    chol, info = torch.linalg.cholesky_ex(m)
    if bool((info > 0).any()):
        raise NotPositiveDefinite
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand_as(m)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return chol_inv.mT @ chol_inv


def _inverse(m: torch.Tensor) -> torch.Tensor:
    """SPD inverse: block recursion on CUDA, LAPACK Cholesky on CPU; float64 when float32 is not enough."""
    def once(x):
        return spd_inverse(x) if x.device.type == "cuda" else _cholesky_inverse(x)

    try:
        return once(m)
    except NotPositiveDefinite:
        log.warning("float32 Cholesky failed for a probe system; retrying this chunk in float64")
    try:
        return once(m.double()).float()
    except NotPositiveDefinite:
        raise ValueError("a probe's regularised Gram matrix is not positive definite even in float64; increase "
                         "alpha (the L2 strength)") from None


def _padded(index_lists: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ix) for ix in index_lists)
    idx = np.zeros((len(index_lists), width), dtype=np.int64)
    ok = np.zeros((len(index_lists), width), dtype=bool)
    for f, ix in enumerate(index_lists):
        idx[f, : len(ix)], ok[f, : len(ix)] = ix, True
    return torch.as_tensor(idx, device=device), torch.as_tensor(ok, device=device)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """(cell, sample, feature): the same rule as `stats.standardize`, per cell."""
    mean, std = x.mean(1, keepdim=True), x.std(1, unbiased=False, keepdim=True)
    keep = std > STD_FLOOR * std.amax(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(keep, (x - mean) / torch.where(keep, std, torch.ones_like(std)), torch.zeros_like(x))


def _chunk_cells(n: int, d: int, m: int, q: int, n_folds: int, tk: int, device: torch.device) -> int:
    per_fold = 6 * m * m + 2 * q * m + (3 * MEMORY + 20) * m * tk  # systems, inverses, test kernels, logistic state
    per_cell = 4 * (2 * n * d + 2 * n * n + n_folds * per_fold)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        budget = 0.5 * (free + cached)
    else:
        budget = 2e9
    return max(1, int(budget // per_cell))


class FoldLayout(NamedTuple):
    """Every fold's training and test samples, padded to one length on the device, and the training targets."""

    test: list[np.ndarray]  # test samples of each fold
    tr_idx: torch.Tensor  # (fold, m) training samples, padded
    te_idx: torch.Tensor  # (fold, q) test samples, padded
    w: torch.Tensor  # (fold, m) 1 on training samples, 0 on padding
    m_f: torch.Tensor  # (fold,) number of training samples
    onehot: torch.Tensor  # (fold, target, class, m) training targets, 0 on padding
    absent: torch.Tensor  # (fold, target, class) classes a training part lacks


def fold_layout(folds: np.ndarray, targets: np.ndarray, present: np.ndarray, dev: torch.device) -> FoldLayout:
    """folds (sample,), targets (target, sample) class indices, present (target, fold, class) -> `FoldLayout`."""
    n_folds, k_max = present.shape[1:]
    train = [np.flatnonzero(folds != f) for f in range(n_folds)]
    test = [np.flatnonzero(folds == f) for f in range(n_folds)]
    tr_idx, tr_ok = _padded(train, dev)
    te_idx, _ = _padded(test, dev)
    y = torch.as_tensor(targets, device=dev)  # (target, sample)
    onehot = torch.nn.functional.one_hot(y[:, tr_idx], k_max).float()  # (target, fold, m, class)
    return FoldLayout(test=test, tr_idx=tr_idx, te_idx=te_idx, w=tr_ok.float(),
                      m_f=torch.tensor([len(ix) for ix in train], device=dev, dtype=torch.float32),
                      onehot=onehot.permute(1, 0, 3, 2) * tr_ok[:, None, None, :],
                      absent=~torch.as_tensor(present, device=dev).permute(1, 0, 2))


def fold_kernels(x, layout: FoldLayout, dev: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (cell, sample, feature) -> per fold the training Gram matrix (c, f, m, m) and the test-by-training
    one (c, f, q, m) of the standardised features, both centred on the fold's training mean; 0 on padding."""
    x = x.to(dev, dtype) if hasattr(x, "detach") else torch.as_tensor(np.asarray(x), device=dev, dtype=dtype)
    z = _standardize(x)
    gram = z @ z.mT  # (cell, sample, sample)
    del x, z
    w, m_f, tr_idx = layout.w, layout.m_f, layout.tr_idx
    gtt = gram[:, tr_idx[:, :, None], tr_idx[:, None, :]]  # (c, f, m, m)
    gte = gram[:, layout.te_idx[:, :, None], tr_idx[:, None, :]]  # (c, f, q, m)
    del gram
    if not bool(w.all()):  # folds of unequal size: zero the padding
        gtt.mul_(w[:, :, None] * w[:, None, :])
        gte.mul_(w[:, None, :])
    r_tr = gtt.sum(-1) / m_f[:, None]  # (c, f, m) training-row means
    mu = (r_tr * w).sum(-1, keepdim=True) / m_f[:, None]  # (c, f, 1)
    h, ones = (r_tr - 0.5 * mu) * w, w.expand_as(r_tr)  # centring = two rank-one updates, in place
    gtt.flatten(0, 1).baddbmm_(torch.stack([-h, -ones], -1).flatten(0, 1), torch.stack([ones, h], -2).flatten(0, 1))
    s_te = gte.sum(-1) / m_f[:, None]  # (c, f, q) test-row means over the training columns
    gte.flatten(0, 1).baddbmm_(torch.stack([mu - s_te, torch.ones_like(s_te)], -1).flatten(0, 1),
                               torch.stack([ones, -r_tr * w], -2).flatten(0, 1))
    return gtt, gte


def fit_predict_torch(X, targets: np.ndarray, n_classes: np.ndarray, folds: np.ndarray, present: np.ndarray, *,
                      kind: str, alpha: float, max_iter: int, device: str | None = None):
    """Held-out predictions (cell, target, sample), iterations and convergence per cell, and timings."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_cells, n, d = X.shape
    n_targets, n_folds, k_max = present.shape
    layout = fold_layout(folds, targets, present, dev)
    chunk = _chunk_cells(n, d, layout.tr_idx.shape[1], layout.te_idx.shape[1], n_folds, n_targets * k_max, dev)
    pred = np.empty((n_cells, n_targets, n), dtype=np.int64)
    n_iter = np.zeros(n_cells, dtype=np.int64)
    converged = np.ones(n_cells, dtype=bool)
    timings = {"gram_s": 0.0, "inverse_s": 0.0, "solve_s": 0.0, "iterations_per_chunk": []}
    for c0 in range(0, n_cells, chunk):
        c1 = min(n_cells, c0 + chunk)
        t0 = _tick(dev)
        system, gte = fold_kernels(X[c0:c1], layout, dev)
        reg = alpha * layout.m_f * (1.0 if kind == "ridge" else 2.0)  # (fold,)
        system.diagonal(dim1=-2, dim2=-1).add_(reg[:, None])  # G_train + reg I, in place
        t1 = _tick(dev)
        inv = _inverse(system)  # (c, f, m, m)
        t2 = _tick(dev)
        if kind == "ridge":
            coef, bias = solve_ridge(system, inv, layout)
            iters, conv, loops = np.zeros(c1 - c0, dtype=np.int64), np.ones(c1 - c0, dtype=bool), 0
        else:
            coef, bias, iters, conv, loops = solve_logistic(system, reg, inv, layout, alpha, max_iter)
        del system, inv
        logits = (coef.flatten(2, 3) @ gte.mT).unflatten(2, (n_targets, k_max)) + bias[..., None]  # (c, f, t, k, q)
        hidden = layout.absent[None, :, :, :, None]
        chosen = logits.masked_fill(hidden, float("-inf")).argmax(3).cpu().numpy()  # (c, f, t, q)
        for f, test in enumerate(layout.test):
            pred[c0:c1, :, test] = chosen[:, f, :, : len(test)]
        n_iter[c0:c1], converged[c0:c1] = iters, conv
        t3 = _tick(dev)
        timings["gram_s"] += t1 - t0
        timings["inverse_s"] += t2 - t1
        timings["solve_s"] += t3 - t2
        timings["iterations_per_chunk"].append(loops)
    timings.update(device=str(dev), chunk_cells=chunk)
    return pred, n_iter, converged, timings


def _tick(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def solve_ridge(system, inv, layout: FoldLayout):
    """Closed form on centred +-1 targets, refined twice against the exact system (float32 inverse). Coefficients
    (c, f, t, k, m) and biases (c, f, t, k); the system and its inverse are symmetric: rows multiply from the left."""
    onehot, w = layout.onehot, layout.w[:, None, None, :]
    signs = (2 * onehot - 1) * w  # (f, t, k, m)
    mean = signs.sum(-1) / layout.m_f[:, None, None]  # (f, t, k)
    rhs = ((signs - mean[..., None]) * w).flatten(1, 2)  # (f, t*k, m)
    coef = rhs @ inv  # (c, f, t*k, m)
    for _ in range(2):
        coef = coef + (rhs - coef @ system) @ inv
    return coef.unflatten(2, onehot.shape[1:3]), mean[None].expand(coef.shape[0], -1, -1, -1)


def solve_logistic(system, reg, inv, layout: FoldLayout, alpha: float, max_iter: int):
    """Multinomial logistic regression in the dual, W = X_train^T A, one problem per (cell, fold, target).

    The MM map A <- A - 2m (G + 2 alpha m I)^-1 (R + alpha A), b <- b - 2 sum_i R_i, with R = (softmax - onehot) / m,
    minimises Boehning's quadratic bound on the objective, so each plain step lowers it. Anderson mixing of its last
    MEMORY steps extrapolates; a problem takes the mixed point only where its objective is no higher than the plain
    step's. The MM map sets the part of A the features cannot see (the Gram's null space) to -R/alpha, so mixing its
    outputs keeps that part bounded. A problem stops (its steps become zero) once the plain step moves no training
    logit by more than TOL. Returns A (c, f, t, k, m), b (c, f, t, k), iterations and convergence per cell, and the
    number of iterations run.
    """
    onehot, absent, w, m_f = layout.onehot, layout.absent, layout.w, layout.m_f
    c, f, m = system.shape[:3]
    t, k = onehot.shape[1:3]
    dev = system.device
    wm = (w / m_f[:, None])[None, :, None, None, :]  # (1, f, 1, 1, m): 1/m on training samples, 0 on padding
    step_scale = -2.0 * m_f[:, None] * w  # (f, m): MM step factor on training samples, 0 on padding
    neg_reg = -reg[None, :, None, None, None]
    label = onehot.argmax(2, keepdim=True).expand(c, -1, -1, -1, -1)  # (c, f, t, 1, m) class of each sample

    def objective(a, g, logp):  # mean cross-entropy + alpha/2 |W|^2, per problem (c, f, t)
        ce = (logp.gather(3, label) * wm).sum((3, 4))
        return 0.5 * alpha * torch.linalg.vecdot(a, g).sum(-1) - ce

    counts = onehot.sum(-1) + 1e-3  # (f, t, k)
    bias = torch.log(counts / counts.sum(-1, keepdim=True)).masked_fill(absent, 0.0)
    bias = (bias - bias.mean(-1, keepdim=True)).masked_fill(absent, HIDDEN)  # absent classes get no probability
    bias = bias[None].expand(c, -1, -1, -1).clone()  # (c, f, t, k); the steps never change the HIDDEN entries
    coef = torch.zeros(c, f, t, k, m, device=dev, dtype=system.dtype)
    g_coef = torch.zeros_like(coef)  # G @ coef, tracked by linearity
    logp = torch.log_softmax(g_coef + bias[..., None], dim=3)
    mixer = _Anderson(coef, MEMORY)
    active = torch.ones(c, f, t, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(c, f, t, dtype=torch.long, device=dev)
    loops = 0
    for loops in range(1, max_iter + 1):
        resid = logp.exp().sub_(onehot).mul_(wm)  # (c, f, t, k, m)
        step = torch.add(resid, coef, alpha=alpha).flatten(2, 3) @ inv
        step = step.view_as(coef).mul_(step_scale[:, None, None, :] * active[..., None, None])
        step_b = resid.sum(-1).mul_(-2.0 * active[..., None])  # (c, f, t, k)
        step_g = (step.flatten(2, 3) @ system).view_as(step).addcmul_(step, neg_reg)  # G step, G = system - reg I
        moved = (step_g + step_b[..., None]).mul_(w[None, :, None, None, :])  # the MM step in training logits
        active &= torch.linalg.vector_norm(moved, float("inf"), dim=(3, 4)) > TOL
        n_iter += active
        if not bool(active.any()):
            break
        plain = (coef + step, g_coef + step_g, bias + step_b)
        logp_plain = torch.log_softmax(plain[1] + plain[2][..., None], dim=3)
        mixed = mixer(plain, moved, active)
        if mixed is None:
            coef, g_coef, bias, logp = (*plain, logp_plain)
            continue
        logp_mixed = torch.log_softmax(mixed[1] + mixed[2][..., None], dim=3)
        f_plain = objective(plain[0], plain[1], logp_plain)
        better = objective(mixed[0], mixed[1], logp_mixed) <= f_plain + 1e-6 * f_plain.abs()  # (c, f, t)
        take = better[..., None, None]
        coef, g_coef = torch.where(take, mixed[0], plain[0]), torch.where(take, mixed[1], plain[1])
        bias, logp = torch.where(better[..., None], mixed[2], plain[2]), torch.where(take, logp_mixed, logp_plain)
    iters = n_iter.amax((1, 2)).cpu().numpy()
    return coef, bias, iters, (~active).all(2).all(1).cpu().numpy(), loops


class _Anderson:
    """Type-II Anderson mixing, batched over problems (c, f, t): the last `memory` differences of the map's outputs
    (coefficients, their images, biases) and of its residuals (the steps in logits); returns the output minus the
    combination of output differences whose residual differences best cancel the latest residual (least squares in
    float64 with a relative ridge; a problem whose system fails, or that has stopped, gets the plain output)."""

    def __init__(self, like: torch.Tensor, memory: int):
        c, f, t, k, m = like.shape
        self.memory, self.count, self.last = memory, 0, None
        self.d_coef, self.d_image, self.d_resid = (like.new_zeros(c, f, t, memory, k * m) for _ in range(3))
        self.d_bias = like.new_zeros(c, f, t, memory, k)
        self.gram = like.new_zeros(c, f, t, memory, memory, dtype=torch.float64)

    def __call__(self, out: tuple[torch.Tensor, ...], resid: torch.Tensor, active: torch.Tensor):
        flat = resid.flatten(3)  # (c, f, t, k*m)
        if self.last is None:
            self.last = (*out, resid)
            return None
        slot = self.count % self.memory
        for store, new, old in zip((self.d_coef, self.d_image, self.d_bias, self.d_resid), (*out, resid), self.last):
            torch.sub(new.flatten(3), old.flatten(3), out=store[:, :, :, slot])
        self.last = (*out, resid)
        self.count += 1
        h = min(self.count, self.memory)
        dots = (self.d_resid[:, :, :, :h] @ torch.stack([self.d_resid[:, :, :, slot], flat], -1)).double()
        self.gram[..., slot, :h] = dots[..., 0]  # (c, f, t, h): the new difference against every stored one
        self.gram[..., :h, slot] = dots[..., 0]
        gram = self.gram[..., :h, :h]
        ridge = 1e-10 * gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] + 1e-300
        gamma, info = torch.linalg.solve_ex(gram + ridge * torch.eye(h, dtype=gram.dtype, device=gram.device),
                                            dots[..., 1:])
        ok = (info == 0) & active & gamma.isfinite().all((-2, -1))
        gamma = torch.where(ok[..., None, None], gamma, 0.0).to(resid.dtype).mT  # (c, f, t, 1, h)
        return tuple(torch.baddbmm(o.flatten(0, 2).flatten(1)[:, None], gamma.flatten(0, 2),
                                   d[:, :, :, :h].flatten(0, 2), alpha=-1.0).view_as(o)
                     for o, d in zip(out, (self.d_coef, self.d_image, self.d_bias)))
