"""The eigen and trace algorithms on a Hessian-vector product operator: power iteration with
deflation, Lanczos and stochastic Lanczos quadrature, Hutchinson, Hutch++ and the exact trace."""
from __future__ import annotations

import math

import torch

from .._progress import ProgressBar
from .hvp_operator import _HVP
from .vectors import (Vector, _axpy, _dot, _flatten, _gaussian, _normalize, _orthogonalize,
                      _rademacher, _scale, _unflatten)


def _power_iteration(op: _HVP, top_n, max_iter, tol, gen, progress=False, init=None,
                     stats=None):
    """``init``: start vector of the first eigenvalue (a warm start, e.g. the previous
    eigenvector during training); ``stats``: a dict that receives the number of products."""
    eigenvalues, eigenvectors = [], []
    bar = ProgressBar(top_n, "top eigenvalues", progress)
    products = 0
    for j in range(top_n):
        v = _gaussian(op.params, gen)
        if j == 0 and init is not None:
            v = [x.detach().to(device=p.device, dtype=p.dtype) for x, p in zip(init, op.params)]
        v = _normalize(v)
        eig = None
        for _ in range(max_iter):
            v = _normalize(_orthogonalize(v, eigenvectors))
            hv = op([v])[0]
            products += 1
            new = _dot(hv, v)
            v = _normalize(hv)
            del hv
            if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
                eig = new
                break
            eig = new
        eigenvalues.append(eig)
        eigenvectors.append(_normalize(_orthogonalize(v, eigenvectors)))
        bar.update()
    bar.close()
    if stats is not None:
        stats["products"] = products
    return eigenvalues, eigenvectors


def _lanczos(op: _HVP, iters, v0: Vector, keep_basis: bool, progress=False, desc="lanczos"):
    """Lanczos with full reorthogonalization. Returns (alphas, betas, basis or None)."""
    m = max(1, min(int(iters), op.dim))
    v = _normalize(v0)
    basis = [v]
    alphas, betas = [], []
    bar = ProgressBar(m, desc, progress)
    w = op([v])[0]
    alpha = _dot(w, v)
    w = _axpy(-alpha, v, w)
    alphas.append(alpha)
    bar.update()
    for _ in range(1, m):
        w = _orthogonalize(w, basis)
        beta = math.sqrt(max(_dot(w, w), 0.0))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if beta <= 1e-10 * max(scale, 1e-30):  # invariant subspace: T is exact
            break
        v_prev, v = v, _scale(1.0 / beta, w)
        basis.append(v)
        betas.append(beta)
        w = op([v])[0]
        alpha = _dot(w, v)
        w = _axpy(-alpha, v, _axpy(-beta, v_prev, w))
        alphas.append(alpha)
        bar.update()
    bar.close()
    return alphas, betas, (basis if keep_basis else None)


def _tridiagonal(alphas, betas):
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        b = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t


def _slq(op: _HVP, iters, n_v, gen, progress=False):
    nodes, weights = [], []
    for k in range(n_v):
        alphas, betas, _ = _lanczos(op, iters, _rademacher(op.params, gen), keep_basis=False,
                                    progress=progress, desc=f"density {k + 1}/{n_v}")
        evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
        nodes.append(evals.tolist())
        weights.append((evecs[0, :] ** 2).tolist())
    return nodes, weights


def _hutchinson(op: _HVP, num_probes, gen, progress=False, chunk=1):
    """Per-probe, per-parameter z_l . (H z)_l (the diagonal-block estimates)."""
    per_probe = []
    bar = ProgressBar(num_probes, "hessian trace", progress)
    done = 0
    while done < num_probes:
        zs = [_rademacher(op.params, gen) for _ in range(min(chunk, num_probes - done))]
        for z, hz in zip(zs, op(zs)):
            per_probe.append([_dot([a], [b]) for a, b in zip(z, hz)])
        done += len(zs)
        bar.update(len(zs))
    bar.close()
    return per_probe


def _exact_trace(op: _HVP, progress=False, chunk=1):
    """Per-parameter diagonal-block traces from the unit vectors: sum_i (H e_i)_i, one product
    per selected entry, ``chunk`` products per pass over the data; summed in float64."""
    units = [(j, i) for j, p in enumerate(op.params) for i in range(p.numel())]
    traces = [0.0] * len(op.params)
    bar = ProgressBar(len(units), "hessian trace (exact)", progress)
    for start in range(0, len(units), chunk):
        part = units[start:start + chunk]
        vectors = []
        for j, i in part:
            v = [torch.zeros_like(p) for p in op.params]
            v[j].view(-1)[i] = 1
            vectors.append(v)
        for (j, i), hv in zip(part, op(vectors)):
            traces[j] += float(hv[j].reshape(-1)[i].double())
        bar.update(len(part))
    bar.close()
    return traces


def _hutchpp(op: _HVP, num_probes, gen, progress=False, chunk=1):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with per-block traces.

    k = num_probes // 3 sketch vectors S give Q = orth(H S); the rest (num_probes - 2k) are
    Rademacher probes G projected off Q. For the diagonal block l (selector P_l),
        tr(P_l H) = sum_i (q_i)_l . ((2I - QQ^T) H q_i)_l                           (exact)
                  + mean_j (g_j)_l . ((I - QQ^T) H (I - QQ^T) g_j)_l                 (unbiased)
    which sums over l to the usual Hutch++ estimate tr(Q^T H Q) + mean_j g~_j^T H g~_j.
    Returns the per-parameter estimates.

    Memory: the sketch H S and Q are the only k-column matrices (the QR needs both at once);
    the q_i and g_j products are streamed ``chunk`` vectors at a time, so the peak is about
    2k + 3 chunk parameter-sized vectors. The random draws are in the same order as when
    everything is materialised (S, then G after Q), so a seed gives the same estimate.
    """
    if num_probes < 3:
        raise ValueError("hutch++ needs num_probes >= 3")
    k = num_probes // 3
    n_g = num_probes - 2 * k
    chunk = max(1, int(chunk))
    dev = op.params[0].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in op.params) else torch.float32
    sizes = [p.numel() for p in op.params]
    bar = ProgressBar(num_probes, "hessian trace (hutch++)", progress)

    hs = torch.empty(sum(sizes), k, device=dev, dtype=dtype)
    for i0 in range(0, k, chunk):
        s = [_rademacher(op.params, gen) for _ in range(min(chunk, k - i0))]
        for i, v in enumerate(op(s)):
            hs[:, i0 + i] = _flatten(v, dev, dtype)
        del s
        bar.update(min(chunk, k - i0))
    q, _ = torch.linalg.qr(hs)
    del hs

    def blockwise(a, b):  # per-parameter sums of a*b (a, b flat vectors)
        return [float(x.sum()) for x in torch.split(a * b, sizes)]

    exact = [0.0] * len(sizes)
    for i0 in range(0, q.shape[1], chunk):
        cols = range(i0, min(i0 + chunk, q.shape[1]))
        for i, hv in zip(cols, op([_unflatten(q[:, i], op.params) for i in cols])):
            hq = _flatten(hv, dev, dtype)
            del hv
            hq = 2 * hq - q @ (q.T @ hq)
            exact = [e + b for e, b in zip(exact, blockwise(q[:, i], hq))]
        bar.update(len(cols))
    stoch = [0.0] * len(sizes)
    for j0 in range(0, n_g, chunk):
        gs = [_flatten(_rademacher(op.params, gen), dev, dtype)
              for _ in range(min(chunk, n_g - j0))]
        projected = [_unflatten(g - q @ (q.T @ g), op.params) for g in gs]
        for g, hv in zip(gs, op(projected)):
            hg = _flatten(hv, dev, dtype)
            del hv
            stoch = [t + b for t, b in zip(stoch, blockwise(g, hg - q @ (q.T @ hg)))]
        del gs, projected
        bar.update(min(chunk, n_g - j0))
    bar.close()
    return [e + s_ / n_g for e, s_ in zip(exact, stoch)]
