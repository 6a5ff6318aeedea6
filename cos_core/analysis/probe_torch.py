"""The batched probe engine: every (cell, fold, label) problem of a `probes.ProbeGrid` fitted at once with torch, in
kernel (dual) form: per cell one Gram matrix of the standardised features, per fold its training block centred on the
training mean, one SPD inverse per (cell, fold) shared by all labels and their control tasks; ridge is then closed form
(plus two refinement steps), logistic regression Boehning's bound-Hessian MM steps with Nesterov momentum and adaptive
restart. On CUDA the inverse is a recursive block (Schur complement) inversion made of matrix products.
Imports torch and `stats` (the standardisation rule); never `probes`, which calls this engine.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .stats import STD_FLOOR

log = logging.getLogger(__name__)

BLOCK = 128  # below this size the SPD inverse uses Cholesky directly
TOL = 1e-4  # logistic: stop when no training logit moves by more than this in one step
CHECK_EVERY = 10  # iterations between convergence checks (each one synchronises with the device)


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
    per_cell = 4 * (2 * n * d + 2 * n * n + n_folds * (6 * m * m + 2 * q * m + 16 * m * tk))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        budget = 0.5 * (free + cached)
    else:
        budget = 2e9
    return max(1, int(budget // per_cell))


def fit_predict_torch(X, targets: np.ndarray, n_classes: np.ndarray, folds: np.ndarray, present: np.ndarray, *,
                      kind: str, alpha: float, max_iter: int, device: str | None = None):
    """Held-out predictions (cell, target, sample), iterations and convergence per cell, and timings."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_cells, n, d = X.shape
    n_targets, n_folds, k_max = present.shape
    train = [np.flatnonzero(folds != f) for f in range(n_folds)]
    test = [np.flatnonzero(folds == f) for f in range(n_folds)]
    tr_idx, tr_ok = _padded(train, dev)  # (fold, m)
    te_idx, _ = _padded(test, dev)  # (fold, q)
    m_f = torch.tensor([len(ix) for ix in train], device=dev, dtype=torch.float32)  # (fold,)
    y = torch.as_tensor(targets, device=dev)  # (target, sample)
    onehot = torch.nn.functional.one_hot(y[:, tr_idx], k_max).float()  # (target, fold, m, class)
    onehot = onehot.permute(1, 2, 0, 3) * tr_ok[:, :, None, None]  # (fold, m, target, class)
    absent = ~torch.as_tensor(present, device=dev).permute(1, 0, 2)  # (fold, target, class)
    chunk = _chunk_cells(n, d, tr_idx.shape[1], te_idx.shape[1], n_folds, n_targets * k_max, dev)
    pred = np.empty((n_cells, n_targets, n), dtype=np.int64)
    n_iter = np.zeros(n_cells, dtype=np.int64)
    converged = np.ones(n_cells, dtype=bool)
    timings = {"gram_s": 0.0, "inverse_s": 0.0, "solve_s": 0.0}
    w = tr_ok.float()  # (fold, m)
    for c0 in range(0, n_cells, chunk):
        c1 = min(n_cells, c0 + chunk)
        t0 = _tick(dev)
        x = X[c0:c1]
        x = x.to(dev, torch.float32) if hasattr(x, "detach") else torch.as_tensor(np.asarray(x), device=dev).float()
        z = _standardize(x)
        gram = z @ z.mT  # (cell, sample, sample)
        del x, z
        ww = w[:, :, None] * w[:, None, :]  # (fold, m, m) training pairs
        gtt = gram[:, tr_idx[:, :, None], tr_idx[:, None, :]].mul_(ww)  # (c, f, m, m)
        gte = gram[:, te_idx[:, :, None], tr_idx[:, None, :]].mul_(w[:, None, :])  # (c, f, q, m)
        del gram
        r_tr = gtt.sum(-1) / m_f[:, None]  # (c, f, m) training-row means
        mu = (r_tr * w).sum(-1) / m_f  # (c, f)
        gtt.sub_(r_tr[..., :, None]).sub_(r_tr[..., None, :]).add_(mu[..., None, None]).mul_(ww)  # centred
        gte.sub_((gte.sum(-1) / m_f[:, None])[..., None]).sub_(r_tr[..., None, :]).add_(mu[..., None, None])
        gte.mul_(w[:, None, :])
        reg = alpha * m_f * (1.0 if kind == "ridge" else 2.0)  # (fold,)
        system = gtt
        system.diagonal(dim1=-2, dim2=-1).add_(reg[:, None])  # G_train + reg I, in place
        t1 = _tick(dev)
        inv = _inverse(system)  # (c, f, m, m)
        t2 = _tick(dev)
        if kind == "ridge":
            coef, bias = _ridge(system, inv, onehot, w, m_f)
            iters, conv = np.zeros(c1 - c0, dtype=np.int64), np.ones(c1 - c0, dtype=bool)
        else:
            coef, bias, iters, conv = _logistic(system, reg, inv, onehot, absent, w, m_f, alpha, max_iter)
        del system, inv, gtt
        logits = (gte @ coef.flatten(-2)).unflatten(-1, (n_targets, k_max)) + bias[:, :, None]  # (c, f, q, t, k)
        logits = logits.masked_fill(absent[None, :, None], float("-inf"))
        chosen = logits.argmax(-1).cpu().numpy()  # (c, f, q, t)
        for f in range(n_folds):
            pred[c0:c1, :, test[f]] = chosen[:, f, : len(test[f])].transpose(0, 2, 1)
        n_iter[c0:c1], converged[c0:c1] = iters, conv
        t3 = _tick(dev)
        timings["gram_s"] += t1 - t0
        timings["inverse_s"] += t2 - t1
        timings["solve_s"] += t3 - t2
    timings.update(device=str(dev), chunk_cells=chunk)
    return pred, n_iter, converged, timings


def _tick(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def _ridge(system, inv, onehot, w, m_f):
    """Closed form on centred +-1 targets, refined twice against the exact system (float32 inverse)."""
    signs = (2 * onehot - 1) * w[:, :, None, None]  # (f, m, t, k)
    mean = signs.sum(1) / m_f[:, None, None]  # (f, t, k)
    rhs = ((signs - mean[:, None]) * w[:, :, None, None]).flatten(-2)  # (f, m, t*k)
    coef = inv @ rhs  # (c, f, m, t*k)
    for _ in range(2):
        coef = coef + inv @ (rhs - system @ coef)
    return coef.unflatten(-1, onehot.shape[-2:]), mean[None].expand(coef.shape[0], -1, -1, -1)


def _logistic(system, reg, inv, onehot, absent, w, m_f, alpha, max_iter):
    """Multinomial logistic regression in the dual: W = X_train^T A, step = (G/2m + alpha I)^-1 grad (Boehning's
    bound, so each plain step decreases the objective), accelerated (FISTA) with gradient restart per problem."""
    c, f, m, _ = system.shape
    t, k = onehot.shape[-2:]
    mask = w[:, :, None, None]  # (f, m, 1, 1)
    counts = onehot.sum(1) + 1e-3  # (f, t, k)
    bias = torch.log(counts / counts.sum(-1, keepdim=True)).masked_fill(absent, 0.0)
    bias = (bias - bias.mean(-1, keepdim=True))[None].expand(c, -1, -1, -1).clone()  # (c, f, t, k)
    coef = torch.zeros(c, f, m, t, k, device=system.device)
    g_coef = torch.zeros_like(coef)  # G @ coef, tracked by linearity
    prev, g_prev, bias_prev = coef, g_coef, bias
    momentum_t = torch.ones(c, f, t, device=system.device)
    done_at = torch.full((c, f, t), max_iter, device=system.device, dtype=torch.long)
    conv = torch.zeros(c, f, t, dtype=torch.bool, device=system.device)
    scale = (2.0 * m_f)[None, :, None, None]
    for it in range(max_iter):
        t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * momentum_t**2))
        beta = ((momentum_t - 1.0) / t_next)[:, :, None, :, None]  # (c, f, 1, t, 1)
        y_coef = coef + beta * (coef - prev)
        y_g = g_coef + beta * (g_coef - g_prev)
        y_bias = bias + beta[:, :, 0] * (bias - bias_prev)
        logits = (y_g + y_bias[:, :, None]).masked_fill(absent[None, :, None], float("-inf"))
        resid = (torch.softmax(logits, -1) - onehot) * mask / m_f[None, :, None, None, None]  # (c, f, m, t, k)
        grad = resid + alpha * y_coef
        grad_bias = resid.sum(2)  # (c, f, t, k)
        step = (scale * (inv @ grad.flatten(-2))).unflatten(-1, (t, k)) * mask
        new = y_coef - step
        new_bias = y_bias - 2.0 * grad_bias
        g_step = (system @ step.flatten(-2)).unflatten(-1, (t, k)) - reg[None, :, None, None, None] * step
        new_g = y_g - g_step  # G @ new, with G = system - reg I
        moved = (new_g - g_coef).abs().amax((2, 4)) + (new_bias - bias).abs().amax(-1)  # (c, f, t)
        restart = ((grad * (new_g - g_coef)).sum((2, 4)) + (grad_bias * (new_bias - bias)).sum(-1)) > 0
        momentum_t = torch.where(restart, torch.ones_like(t_next), t_next)
        keep = restart[:, :, None, :, None]
        prev, g_prev, bias_prev = torch.where(keep, new, coef), torch.where(keep, new_g, g_coef), \
            torch.where(restart[..., None], new_bias, bias)
        coef, g_coef, bias = new, new_g, new_bias
        conv = moved < TOL
        done_at = torch.where(conv & (done_at == max_iter), torch.full_like(done_at, it + 1), done_at)
        done_at = torch.where(~conv, torch.full_like(done_at, max_iter), done_at)
        if (it + 1) % CHECK_EVERY == 0 and bool(conv.all()):
            break
    iters = done_at.amax((1, 2)).cpu().numpy()
    return coef, bias, iters, conv.all(2).all(1).cpu().numpy()
