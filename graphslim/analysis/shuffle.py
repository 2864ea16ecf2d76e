"""Graph-independent math of the ``shuffle`` pass: a 1×1 layer ``W [C, N]`` approximated by a grouped one
with channel permutations, ``y ≈ P_out · blockdiag(W_1..W_g) · P_in · x``.

A grouping is a pair of label vectors: ``in_labels [C]`` and ``out_labels [N]`` in ``0..g-1``, each group
holding exactly C/g inputs and N/g outputs; block b maps the inputs labelled b to the outputs labelled b.

* :func:`cocluster` — the grouping keeping the most of a non-negative affinity ``A [C, N]`` (``W²`` for the
  weight energy; ``diag(Σ)·W²`` for the output energy under input second moments Σ): the kept quantity
  is Σ_b Σ_{i∈I_b, j∈O_b} A_ij. Starts: the contiguous grouping (no permutation at all) and a few
  balanced cuts of the spectral co-clustering embedding of A (Dhillon 2001: leading singular vectors of
  D₁^-½ A D₂^-½, projected on random directions, sorted and cut into g equal chunks, then a balanced
  k-means in the embedding). Each start is improved by alternating exact-size swap rounds (output labels
  given the input labels, then input labels given the output labels; every swap strictly raises the
  kept quantity), and the best grouping is returned (ties: the earliest start, so the contiguous one).
  A kernel that is block-diagonal up to permutation gives a block-diagonal affinity whose embedding is
  constant on each block: the grouping is found and the approximation is exact.
* :func:`block_fit` — the weights on the kept blocks: ``W`` masked (the best Frobenius fit on that
  support) or, with input second moments Σ, per block the least-squares fit of the block's outputs
  from its inputs, ``W[I, O] + (Σ_II + λ)⁻¹ Σ_IĪ W[Ī, O]`` (the dropped inputs' contribution regressed on
  the kept ones; λ a small ridge, so unseen inputs keep their weights).
* :func:`block_refit` — the same least-squares fit from a calibration
  :class:`~graphslim.analysis.calibration.Regression` whose features are the layer's inputs (plus a
  column of ones for the bias) and whose targets are the original model's outputs.
* :func:`layout` — the group order and the gathers that emission needs (identity permutations omitted).
"""

from __future__ import annotations

import numpy as np

__all__ = ["block_fit", "block_mask", "block_refit", "cocluster", "grouped_kernel", "kept_fraction", "layout",
           "output_energy_kept"]

DAMPING = 1e-3  # relative ridge of the data-aware block fit (× mean diagonal of Σ)
SPECTRAL_STARTS = 3  # random projections of the spectral embedding tried as starts
ROUNDS = 30  # alternations (output swaps, input swaps) per start at most


# --------------------------------------------------------------------------------------------- grouping
def _onehot(labels: np.ndarray, g: int) -> np.ndarray:
    m = np.zeros((len(labels), g))
    m[np.arange(len(labels)), labels] = 1.0
    return m


def kept_fraction(affinity: np.ndarray, in_labels: np.ndarray, out_labels: np.ndarray) -> float:
    """Σ of ``affinity`` over the kept blocks / Σ of ``affinity`` (1 for an all-zero affinity)."""
    total = float(affinity.sum())
    if total <= 0:
        return 1.0
    return float(affinity[in_labels[:, None] == out_labels[None, :]].sum()) / total


def block_mask(in_labels: np.ndarray, out_labels: np.ndarray) -> np.ndarray:
    """``[C, N]`` booleans: which weights a grouping keeps."""
    return np.asarray(in_labels)[:, None] == np.asarray(out_labels)[None, :]


def _assign(score: np.ndarray, g: int) -> np.ndarray:
    """Balanced labels for ``score [n, g]`` (value of item i in group b): greedy by descending score,
    each group taking n/g items."""
    n = score.shape[0]
    cap = np.full(g, n // g)
    labels = np.full(n, -1)
    for flat in np.argsort(-score, axis=None, kind="stable"):
        i, b = divmod(int(flat), g)
        if labels[i] < 0 and cap[b] > 0:
            labels[i] = b
            cap[b] -= 1
    return labels


def _swaps(score: np.ndarray, labels: np.ndarray, tol: float, max_rounds: int = 200) -> tuple[np.ndarray, bool]:
    """Improve balanced ``labels`` for a fixed ``score [n, g]`` by swapping pairs of items between groups.

    With the score fixed, swaps of disjoint pairs are independent: each round takes, for every item, its
    best partner, then the disjoint positive swaps by descending gain. Returns (labels, changed)."""
    labels = labels.copy()
    changed = False
    n = len(labels)
    idx = np.arange(n)
    for _ in range(max_rounds):
        cur = score[idx, labels]
        cross = score[:, labels]  # [i, k] = score of item i in k's group
        gain = cross + cross.T - cur[:, None] - cur[None, :]
        best = gain.argmax(1)
        best_gain = gain[idx, best]
        order = np.argsort(-best_gain, kind="stable")
        used = np.zeros(n, bool)
        moved = False
        for i in order:
            if best_gain[i] <= tol:
                break
            k = best[i]
            if used[i] or used[k]:
                continue
            labels[i], labels[k] = labels[k], labels[i]
            used[i] = used[k] = True
            moved = True
        if not moved:
            break
        changed = True
    return labels, changed


def _refine(a: np.ndarray, g: int, in_labels: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    out_labels = _assign(a.T @ _onehot(in_labels, g), g)
    for _ in range(ROUNDS):
        out_labels, c1 = _swaps(a.T @ _onehot(in_labels, g), out_labels, tol)
        in_labels, c2 = _swaps(a @ _onehot(out_labels, g), in_labels, tol)
        if not (c1 or c2):
            break
    return in_labels, out_labels


def _spectral_starts(a: np.ndarray, g: int, rng: np.random.Generator) -> list[np.ndarray]:
    c = a.shape[0]
    d1, d2 = a.sum(1), a.sum(0)
    r1 = np.where(d1 > 0, 1.0 / np.sqrt(np.where(d1 > 0, d1, 1.0)), 0.0)
    r2 = np.where(d2 > 0, 1.0 / np.sqrt(np.where(d2 > 0, d2, 1.0)), 0.0)
    u, _, _ = np.linalg.svd(r1[:, None] * a * r2[None, :], full_matrices=False)
    emb = r1[:, None] * u[:, :g]
    emb = emb / (np.linalg.norm(emb, axis=0, keepdims=True) + 1e-300)
    starts = []
    for _ in range(SPECTRAL_STARTS):
        order = np.argsort(emb @ rng.normal(size=emb.shape[1]), kind="stable")
        labels = np.empty(c, int)
        labels[order] = np.arange(c) // (c // g)
        for _ in range(5):  # balanced k-means in the embedding
            centers = _onehot(labels, g).T @ emb / (c // g)
            dist = np.square(emb[:, None, :] - centers[None, :, :]).sum(-1)
            new = _assign(-dist, g)
            if np.array_equal(new, labels):
                break
            labels = new
        starts.append(labels)
    return starts


def cocluster(affinity: np.ndarray, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced co-clustering of the rows (inputs) and columns (outputs) of a non-negative ``affinity
    [C, N]`` into ``groups`` groups (dividing both C and N). Returns ``(in_labels, out_labels, kept
    fraction)``.

    Example::

        in_l, out_l, kept = cocluster(np.square(w), 4)     # w [C, N]: a 1×1 kernel as a matrix
    """
    a = np.abs(np.asarray(affinity, np.float64))
    c, n = a.shape
    g = int(groups)
    if g < 1 or c % g or n % g:
        raise ValueError(f"groups={groups} must be >= 1 and divide both {c} and {n}")
    if g == 1:
        return np.zeros(c, int), np.zeros(n, int), 1.0
    tol = 1e-12 * max(float(a.sum()), 1e-300)
    starts = [np.arange(c) // (c // g)] + _spectral_starts(a, g, np.random.default_rng(seed))
    best = None
    for start in starts:
        in_l, out_l = _refine(a, g, start, tol)
        kept = kept_fraction(a, in_l, out_l)
        if best is None or kept > best[2] + 1e-12:
            best = (in_l, out_l, kept)
    # the same from the output side: contiguous outputs
    out0 = np.arange(n) // (n // g)
    in_l = _assign(a @ _onehot(out0, g), g)
    in_l, out_l = _refine(a, g, in_l, tol)
    kept = kept_fraction(a, in_l, out_l)
    if kept > best[2] + 1e-12:
        best = (in_l, out_l, kept)
    return best


# --------------------------------------------------------------------------------------------- weights
def block_fit(w: np.ndarray, in_labels: np.ndarray, out_labels: np.ndarray, sigma: np.ndarray | None = None,
              damping: float = DAMPING) -> np.ndarray:
    """The block-sparse ``Ŵ [C, N]`` (zero outside the kept blocks): ``W`` masked, or with input second
    moments ``sigma`` the per-block least-squares fit (see the module docstring)."""
    w = np.asarray(w, np.float64)
    mask = block_mask(in_labels, out_labels)
    fit = np.where(mask, w, 0.0)
    if sigma is None:
        return fit
    sigma = (np.asarray(sigma, np.float64) + np.asarray(sigma, np.float64).T) / 2
    mean_diag = float(np.mean(np.diag(sigma)))
    lam = damping * mean_diag if mean_diag > 0 else 1.0
    for b in np.unique(in_labels):
        ins, outs, rest = in_labels == b, out_labels == b, in_labels != b
        if not rest.any():
            continue
        s_ii = sigma[np.ix_(ins, ins)] + lam * np.eye(int(ins.sum()))
        corr = np.linalg.solve(s_ii, sigma[np.ix_(ins, rest)] @ w[np.ix_(rest, outs)])
        fit[np.ix_(ins, outs)] = w[np.ix_(ins, outs)] + corr
    return fit


def output_energy_kept(w: np.ndarray, fit: np.ndarray, sigma: np.ndarray) -> float:
    """1 − E‖xᵀ(W − Ŵ)‖² / E‖xᵀW‖² for inputs with second moments ``sigma``."""
    w = np.asarray(w, np.float64)
    d = w - fit
    total = float(np.sum(w * (sigma @ w)))
    if total <= 0:
        return 1.0
    return float(1.0 - np.sum(d * (sigma @ d)) / total)


def block_refit(acc, b0: np.ndarray, shift0: np.ndarray | None, in_labels: np.ndarray, out_labels: np.ndarray,
                intercept: bool, ridge: float = 1e-3):
    """Refit the kept blocks from a Regression accumulator (features: the layer's C inputs, then a column
    of ones when ``intercept``; targets: the original layer's N outputs). Minimizes ‖T − F·B‖² +
    λ‖B − B0‖² block by block (λ = ``ridge`` × mean diagonal of FᵀF). Returns ``(B [C, N], bias shift or
    None, relative output error of (b0, shift0), of B)``; ``(b0, shift0)`` unchanged when the refit does
    not lower the error. Errors are None when the accumulator saw nothing."""
    c, n = b0.shape
    power = acc.target_power
    if not acc.count or power <= 0:
        return b0, shift0, None, None
    full0 = b0
    if intercept:
        full0 = np.concatenate([b0, (np.zeros((1, n)) if shift0 is None else shift0.reshape(1, n))])
    err0 = float(np.sqrt(acc.residual(full0) / power))
    d = acc.ff.shape[0]
    lam = ridge * np.trace(acc.ff) / d + 1e-12
    full = np.zeros_like(full0)
    for b in np.unique(in_labels):
        rows = np.flatnonzero(in_labels == b)
        if intercept:
            rows = np.append(rows, c)
        cols = np.flatnonzero(out_labels == b)
        ff = acc.ff[np.ix_(rows, rows)] + lam * np.eye(len(rows))
        full[np.ix_(rows, cols)] = np.linalg.solve(ff, acc.ft[np.ix_(rows, cols)] + lam * full0[np.ix_(rows, cols)])
    err = float(np.sqrt(acc.residual(full) / power))
    if not err < err0:
        return b0, shift0, err0, err0
    if intercept:
        return full[:-1], full[-1], err0, err
    return full, None, err0, err


# --------------------------------------------------------------------------------------------- emission
def layout(in_labels: np.ndarray, out_labels: np.ndarray) -> tuple[list, np.ndarray | None, np.ndarray | None]:
    """How to emit a grouping: ``(groups, input gather, output gather)``.

    ``groups`` lists ``(inputs, outputs)`` index arrays (ascending) in emission order: the Split takes the
    gathered input in chunks of C/g channels in that order and the ConcatV2 puts the groups' outputs in
    that order. The input gather (indices into the layer's input channels) and the output gather (indices
    into the concatenated channels giving the layer's output order) are None when they are the identity.
    Of the two group orders (by first input channel, by first output channel), the one leaving fewer
    gathers is taken (ties: by inputs)."""
    g = int(max(in_labels.max(), out_labels.max())) + 1
    blocks = [(np.flatnonzero(in_labels == b), np.flatnonzero(out_labels == b)) for b in range(g)]
    best = None
    for key in (0, 1):
        order = sorted(blocks, key=lambda blk: int(blk[key][0]))
        perm_in = np.concatenate([blk[0] for blk in order])
        q = np.concatenate([blk[1] for blk in order])
        gin = None if np.array_equal(perm_in, np.arange(len(perm_in))) else perm_in
        gout = None if np.array_equal(q, np.arange(len(q))) else np.argsort(q)
        count = (gin is not None) + (gout is not None)
        if best is None or count < best[0]:
            best = (count, order, gin, gout)
    return best[1], best[2], best[3]


def grouped_kernel(fit: np.ndarray, groups: list) -> np.ndarray:
    """``[C/g, N]``: the kept blocks of ``fit`` side by side in emission order (a Split along the last
    axis gives each group's kernel), as Keras stores a ``Conv2D(groups=g)`` kernel."""
    return np.concatenate([fit[np.ix_(ins, outs)] for ins, outs in groups], axis=1)
