"""Truncated SVD of large matrices without full-size temporaries (Halko, Martinsson & Tropp 2011).

For ``W [m, n]`` (streamed along its longer side, in blocks of rows: a file-mapped weight is never
resident whole, see :func:`graphslim.ir.storage.row_blocks`), :func:`randomized_svd` finds the leading
k right singular vectors (of the shorter side) by a randomized range finder with power iterations:
``P`` (n × l, l = k + OVERSAMPLE, orthonormal) ← orth(Wᵀ W P), ``POWER_ITERATIONS`` + 1 times, each
one pass over W accumulating ``Wᵀ (W P)`` block by block; then the eigen-decomposition of the small
``Pᵀ Wᵀ W P`` gives ``V = P·V'`` and ``s² = ‖W vᵢ‖²``. When l reaches n, P is the identity and the
result is W's exact SVD (through the n × n Gram matrix, accumulated in float64). Memory: a few n × l
matrices and one block; the left factor (``W V s^-½``, m × r) is computed by one more pass only when
asked for, in W's floating dtype (float32 for a float32 weight).

Because ``V`` has orthonormal columns, ``W V Vᵀ`` is W projected on them and
``‖W − W V Vᵀ‖² = ‖W‖² − Σ sᵢ²`` exactly: :meth:`PartialSvd.kept` is the kept energy of what is emitted
(not an estimate), for ranks up to k; past k it is extended linearly to 1 at full rank (a lower bound,
so a rank chosen from it by ``energy=`` is never too small; :func:`top_svd` grows k until it is known).

A matrix that is not one array, e.g. the mode-C unfolding of a conv kernel ``[KH, KW, C, N]`` (rows: the
KH·KW slices ``W[h, w]ᵀ``, each ``[N, C]``), is given as :class:`Stacked` parts: the same passes walk
each part's row blocks in turn, with no copy of the whole (``tucker`` uses this). A :class:`Stacked`
matrix is streamed as given (its rows are the long side): ``vecs`` are its right singular vectors.

:func:`use_randomized` is the one policy: the streamed path is for matrices of
``RANDOMIZED_MIN_ENTRIES`` entries or more (``lowrank``'s matrices, ``tucker``'s kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.ir.storage import row_blocks

__all__ = ["OVERSAMPLE", "POWER_ITERATIONS", "RANDOMIZED_MIN_ENTRIES", "PartialSvd", "Stacked", "factored_error",
           "frobenius_sq", "randomized_svd", "top_svd", "use_randomized"]

RANDOMIZED_MIN_ENTRIES = 1 << 22  # matrices with fewer entries (e.g. 2048 × 2048) get the exact SVD
OVERSAMPLE = 10  # extra sketch columns beyond the rank sought
POWER_ITERATIONS = 2  # subspace iterations (each one pass over the matrix)
FIRST_SKETCH = 32  # rank of the first sketch when the rank is chosen by energy


def use_randomized(shape) -> bool:
    """Whether a matrix (or tensor) of ``shape`` is large enough for the streamed SVD (else: the exact one)."""
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) >= RANDOMIZED_MIN_ENTRIES


class Stacked:
    """A matrix given as parts stacked along the rows (``parts[0]``'s rows, then ``parts[1]``'s, ...), all
    with the same columns; the parts may be views (transposed, strided) of one array: nothing is copied.
    Streamed as given: its rows are taken as the long side. Example (mode-C unfolding of a kernel)::

        Stacked([kernel[h, w].T for h in range(kh) for w in range(kw)])   # [KH·KW·N, C]
    """

    def __init__(self, parts):
        self.parts = list(parts)
        if not self.parts or len({p.shape[1] for p in self.parts}) != 1:
            raise ValueError("Stacked needs at least one part, all with the same number of columns")
        self.shape = (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])
        self.dtype = self.parts[0].dtype


def _blocks(t):
    """``(start row, block)`` over the rows of an array or a :class:`Stacked` matrix."""
    if not isinstance(t, Stacked):
        yield from row_blocks(t)
        return
    offset = 0
    for part in t.parts:
        for start, b in row_blocks(part):
            yield offset + start, b
        offset += part.shape[0]


def _work_dtype(w):
    return np.float64 if w.dtype == np.float64 else np.float32


def _tall(w):
    """``(matrix streamed by rows, transposed?)``: rows along W's longer side (a :class:`Stacked` as given)."""
    if isinstance(w, Stacked):
        return w, False
    return (w, False) if w.shape[0] >= w.shape[1] else (w.T, True)


def frobenius_sq(w: np.ndarray) -> float:
    """‖W‖²_F, accumulated in float64 block by block."""
    t, _ = _tall(w)
    total = 0.0
    for _, b in _blocks(t):
        b = np.asarray(b, _work_dtype(w))
        total += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
    return total


def _gram_times(t, p, dtype, norm: bool = False):
    """``tᵀ (t p)`` (computed in ``dtype`` per block, summed over blocks in float64) and, with ``norm``,
    ‖t‖² (in float64; else None), streamed over row blocks of ``t``. ``p`` None is the identity: the
    Gram matrix ``tᵀ t``."""
    n = t.shape[1]
    out = np.zeros((n, n if p is None else p.shape[1]))
    total = 0.0 if norm else None
    pw = None if p is None else p.astype(dtype)
    for _, b in _blocks(t):
        b = np.asarray(b, dtype)
        out += b.T @ (b if pw is None else b @ pw)
        if norm:
            total += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
    return out, total


@dataclass
class PartialSvd:
    """The leading singular values ``s`` (k, descending) and vectors of a matrix W [m, n] along its
    shorter side: ``vecs`` [short, k] orthonormal (right vectors of W if m ≥ n, else left ones)."""

    s: np.ndarray
    vecs: np.ndarray
    total: float  # ‖W‖²_F
    shape: tuple
    exact: bool  # k is the full rank: an exact SVD

    @property
    def full(self) -> int:
        return min(self.shape)

    @property
    def k(self) -> int:
        return len(self.s)

    def kept(self) -> np.ndarray:
        """Kept fraction of ‖W‖² at ranks 0..full: exact up to k, then linear to 1."""
        if self.total <= 0:
            return np.ones(self.full + 1)
        head = np.concatenate([[0.0], np.cumsum(np.square(self.s)) / self.total])
        head = np.minimum(head, 1.0)
        rest = self.full - self.k
        if rest <= 0:
            return head
        last = head[-1]
        return np.concatenate([head, last + (1.0 - last) * np.arange(1, rest + 1) / rest])

    def factors(self, w: np.ndarray, r: int):
        """``U [m, r]``, ``V [r, n]`` with ``U @ V`` = W projected on the leading r vectors, √s split
        between them; the long factor is computed by one pass over ``w``, in its floating dtype."""
        r = min(r, self.k)
        s = self.s[:r]
        safe = np.where(s > 0, s, 1.0)
        short = self.vecs[:, :r] * np.sqrt(s)  # [short side, r]
        t, transposed = _tall(w)
        dt = _work_dtype(w)
        proj = (self.vecs[:, :r] / np.sqrt(safe) * (s > 0)).astype(dt)
        long = np.empty((t.shape[0], r), dt)
        for start, b in _blocks(t):
            long[start:start + len(b)] = np.asarray(b, dt) @ proj
        if transposed:  # w.T was streamed: vecs are W's left vectors
            return short, long.T
        return long, short.T


def randomized_svd(w: np.ndarray, k: int, *, power: int = POWER_ITERATIONS, seed: int = 0) -> PartialSvd:
    """The leading ``k`` singular triplets of ``w`` by a randomized range finder with ``power`` power
    iterations (exact when ``k + OVERSAMPLE`` reaches the shorter side). See the module docstring."""
    t, _ = _tall(w)
    n = t.shape[1]
    k = max(1, min(k, n))
    width = k + OVERSAMPLE
    if width >= n:  # the whole row space: exact, through the Gram matrix, one pass
        p = None
        iterations = 0
    else:
        p = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, width)))[0]
        iterations = power
    for _ in range(iterations):  # the subspace only: the weight's precision is enough
        z, _ = _gram_times(t, p, _work_dtype(t))
        p = np.linalg.qr(z)[0]
    # The spectrum: the exact Gram matrix (full rank) in float64, its small eigenvalues being squares;
    # a sketch in the weight's precision per block, summed in float64 (a float64 pass took 2.3× as long).
    z, total = _gram_times(t, p, np.float64 if width >= n else _work_dtype(t), norm=True)
    c = z if p is None else p.T @ z
    e, q = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(e)[::-1][:n if width >= n else k]
    s = np.sqrt(np.maximum(e[order], 0.0))
    vecs = q[:, order] if p is None else p @ q[:, order]
    return PartialSvd(s=s, vecs=vecs, total=total, shape=tuple(w.shape), exact=width >= n)


def top_svd(w: np.ndarray, *, rank: int | None = None, energy: float | None = None, stop: int | None = None,
            seed: int = 0) -> PartialSvd:
    """A :class:`PartialSvd` of ``w`` holding ``rank`` triplets, or (``energy``) enough of them to keep
    that fraction of ‖W‖²: sketches of rank 32, 64, ... until the energy is reached, the rank reaches
    ``stop`` (where it no longer pays) or the full rank (exact)."""
    full = min(w.shape)
    if rank is not None:
        return randomized_svd(w, rank, seed=seed)
    k = min(FIRST_SKETCH, full)
    while True:
        ps = randomized_svd(w, k, seed=seed)
        if ps.exact or ps.kept()[ps.k] >= energy - 1e-12 or (stop is not None and k >= stop):
            return ps
        k = min(2 * k, full)


def factored_error(w: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """‖W − U V‖ / ‖W‖ (``U [m, r]``, ``V [r, n]``), block by block over W's rows: no m × n temporary."""
    num = den = 0.0
    for start, b in row_blocks(w):
        b = np.asarray(b, np.float64)
        num += float(np.square(b - u[start:start + len(b)] @ v).sum())
        den += float(np.square(b).sum())
    return float(np.sqrt(num / den)) if den else 0.0
