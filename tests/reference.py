"""Float64 NumPy references of every method, written from METHODS.md's formulas.

They normalize raw pixels over explicitly built normalization sets (np.mean /
np.var over the axes of a reshaped array): no moments, no pooling, nothing shared
with the library. Layout: channels last, ``x`` of shape ``(N, ..., C)``.
"""

from __future__ import annotations

import numpy as np


def _five(x, g_m, g_c, strided=False):
    """View ``x`` as (G_M, N/G_M, S, G_C, C/G_C) and a function undoing it."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[0], x.shape[-1]
    s = int(np.prod(x.shape[1:-1], dtype=int))
    order = np.arange(n)
    if strided:  # group g holds samples g, g + G_M, ...
        order = np.concatenate([np.arange(g, n, g_m) for g in range(g_m)])
    v = x[order].reshape(g_m, n // g_m, s, g_c, c // g_c)
    inverse = np.argsort(order)

    def undo(a):
        a = np.broadcast_to(a, v.shape).reshape((n,) + x.shape[1:])
        return a[inverse]

    return v, undo


def set_stats(x, *, batch_groups, channel_groups, strided=False):
    """Mean and biased variance of each normalization set, broadcast to ``x``.

    ``batch_groups``: number of sample groups (None: each sample alone);
    ``channel_groups``: number of channel groups (None: each channel alone).
    """
    n, c = x.shape[0], x.shape[-1]
    g_m = n if batch_groups is None else batch_groups
    g_c = c if channel_groups is None else channel_groups
    v, undo = _five(x, g_m, g_c, strided)
    mean = v.mean(axis=(1, 2, 4), keepdims=True)
    var = v.var(axis=(1, 2, 4), keepdims=True)
    return undo(mean), undo(var)


def affine(y, gamma=None, beta=None):
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


def normalize_sets(x, eps, *, batch_groups, channel_groups, strided=False):
    mean, var = set_stats(x, batch_groups=batch_groups, channel_groups=channel_groups,
                          strided=strided)
    return (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)


def batch_norm(x, eps=1e-5, gamma=None, beta=None):
    return affine(normalize_sets(x, eps, batch_groups=1, channel_groups=None), gamma, beta)


def ghost_norm(x, g_m, eps=1e-5, gamma=None, beta=None, strided=False):
    return affine(normalize_sets(x, eps, batch_groups=g_m, channel_groups=None,
                                 strided=strided), gamma, beta)


def group_norm(x, g_c, eps=1e-6, gamma=None, beta=None):
    return affine(normalize_sets(x, eps, batch_groups=None, channel_groups=g_c), gamma, beta)


def batch_group_norm(x, g_m, g_c, eps=1e-5, gamma=None, beta=None):
    return affine(normalize_sets(x, eps, batch_groups=g_m, channel_groups=g_c), gamma, beta)


def bgn(x, g, eps=1e-5, gamma=None, beta=None):
    return affine(normalize_sets(x, eps, batch_groups=1, channel_groups=g), gamma, beta)


def seq_norm(x, g_c, g_m, eps=1e-5, gamma=None, beta=None, order="group_first"):
    if order == "group_first":
        g = normalize_sets(x, eps, batch_groups=None, channel_groups=g_c)
        y = normalize_sets(g, eps, batch_groups=g_m, channel_groups=None)
    else:
        g = normalize_sets(x, eps, batch_groups=g_m, channel_groups=None)
        y = normalize_sets(g, eps, batch_groups=None, channel_groups=g_c)
    return affine(y, gamma, beta)


# Heterologous normalization: a set is (pools over the batch?, channel groups).
HN_SETS = {
    "batch": (True, None),
    "instance": (False, None),
    "layer": (False, 1),
    "group": (False, "g"),
    "extended": (True, "g"),
    "extended_groups": (True, "g"),
}


def _hn_set_mean(a, kind, groups):
    batch, ch = HN_SETS[kind]
    ch = groups if ch == "g" else ch
    return set_stats(a, batch_groups=1 if batch else None, channel_groups=ch)[0]


def heterologous_norm(x, mean_set="batch", std_set="extended", mean_groups=1, std_groups=1,
                      std_center="mean_set", eps=1e-5, gamma=None, beta=None):
    x = np.asarray(x, np.float64)
    mu = _hn_set_mean(x, mean_set, mean_groups)
    center = mu if std_center == "mean_set" else _hn_set_mean(x, std_set, std_groups)
    var = _hn_set_mean((x - center) ** 2, std_set, std_groups)
    return affine((x - mu) / np.sqrt(var + eps), gamma, beta)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def gn_plus(x, g, lam, variant="gn_first", eps=1e-5, gamma=None, beta=None, bn=None):
    """GN+; ``bn`` replaces the training BatchNorm step (e.g. by its inference)."""
    s = _sigmoid(lam)
    gn = lambda a: normalize_sets(a, eps, batch_groups=None, channel_groups=g)
    if bn is None:
        bn = lambda a: normalize_sets(a, eps, batch_groups=1, channel_groups=None)
    if variant == "gn_first":
        h = gn(x)
        y = s * h + (1 - s) * bn(h)
    elif variant == "bn_first":
        b = bn(x)
        y = s * gn(b) + (1 - s) * b
    else:
        y = s * gn(x) + (1 - s) * bn(x)
    return affine(y, gamma, beta)


def ghost_running_update(x, g_m, strided=False):
    """GhostNorm's EMA targets: whole-batch mean, mean of per-ghost biased variances."""
    x = np.asarray(x, np.float64)
    v, _ = _five(x, g_m, x.shape[-1], strided)
    mean = v.mean(axis=(0, 1, 2)).reshape(-1)
    var = v.var(axis=(1, 2)).mean(axis=0).reshape(-1)
    return mean, var


def example_weighted_inference(x, running_mean, running_var, alpha, eps=1e-5, gamma=None,
                               beta=None):
    """Four Things' inference example weighing, the raw-moment formula of METHODS.md."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1))
    s1 = x.mean(axis=axes, keepdims=True) if axes else x
    s2 = (x**2).mean(axis=axes, keepdims=True) if axes else x**2
    m1, v = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    mu = (1 - alpha) * m1 + alpha * s1
    e2 = (1 - alpha) * (v + m1**2) + alpha * s2
    var = e2 - mu**2
    return affine((x - mu) / np.sqrt(var + eps), gamma, beta)
