"""Tucker-2 math of the ``tucker`` pass (no graph): HOSVD of a K×K conv kernel along its channel modes.

A kernel ``W [KH, KW, C, N]`` is approximated as ``Ŵ = core ×_C A ×_N B`` (Kim et al. 2016):
``A [C, r1]`` (a 1×1 conv C→r1), ``core [KH, KW, r1, r2]`` (a K×K conv r1→r2), ``B [r2, N]`` (a 1×1
conv r2→N). HOSVD (:func:`hosvd`): A = the leading r1 left singular vectors of the mode-C unfolding
``W_(C) [C, KH·KW·N]``, B = the leading r2 of the mode-N unfolding, transposed, and
core = W ×_C Aᵀ ×_N Bᵀ. Exact at r1 = rank W_(C), r2 = rank W_(N) (at most C and N).

Because Ŵ is W projected onto the two mode subspaces (an orthogonal projection of the tensor),
‖W − Ŵ‖² = ‖W‖² − ‖core‖², so the kept fraction of ‖W‖² of every pair (r1, r2) comes from one full
core: :meth:`Hosvd.kept_grid`. Each mode's own spectrum (``s_in``, ``s_out``) gives per-mode kept
energies; :func:`energy_chain` orders the pairs that keep the same fraction in both modes, a
one-dimensional rank knob from (1, 1) to full.

Data-aware: with ``g = Σ^½`` of the input channels' second moments (:func:`~graphslim.analysis.
factorize.whitening`), the HOSVD is of ``W ×_C g`` (the input mode weighted by how much each input
direction carries on the data) and A is mapped back by ``Σ^-½``; still exact at full rank.

Large kernels (``RANDOMIZED_MIN_ENTRIES`` = 4M entries or more, the policy ``lowrank`` uses, e.g.
3×3×2048×2048) are decomposed by :func:`streamed_hosvd`, never through float64 copies of the kernel or
its unfoldings: each mode's basis comes from :mod:`graphslim.analysis.randomized`, streamed over the
kernel's own memory (mode C: the slices ``W[h, w]ᵀ`` stacked, mode N: ``W`` viewed ``[KH·KW·C, N]``), by
the randomized range finder with power iterations when the rank sought is small next to the channels
(``ranks=``, or ``energy=`` growing the sketch 32, 64, ... up to an eighth of the mode's rank, past which
the exact basis costs less), else exactly through the mode's Gram matrix (C×C, N×N: float64 but
channel-sized). The core (the kernel's projection, slice by slice in the kernel's precision) has the
sketch's ranks. Its kept grid is exact for every pair inside the sketch (the bases are orthonormal);
past the sketch the per-mode kept energies are extended linearly to 1, a lower bound
(:meth:`~graphslim.analysis.randomized.PartialSvd.kept`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analysis.factorize import kept_energy
from graphslim.analysis.randomized import FIRST_SKETCH, Stacked, randomized_svd, top_svd

__all__ = ["Hosvd", "compose_tucker", "energy_chain", "first_rank", "hosvd", "mode_energy", "streamed_hosvd",
           "tucker_error", "tucker_factors"]


@dataclass(frozen=True)
class Hosvd:
    """The full HOSVD of a (possibly input-whitened) kernel: mode bases, mode spectra, full core."""

    u_in: np.ndarray  # [C, R1] orthonormal columns, R1 = min(C, KH·KW·N)
    s_in: np.ndarray  # [R1] singular values of the mode-C unfolding
    u_out: np.ndarray  # [N, R2] orthonormal columns, R2 = min(N, KH·KW·C)
    s_out: np.ndarray  # [R2]
    core: np.ndarray  # [KH, KW, R1, R2] (streamed: [KH, KW, k1, k2], the sketch's ranks)
    total: float  # ‖W‖² (of the whitened kernel when whitened)
    ranks: tuple[int, int] | None = None  # (R1, R2) when the bases are partial (streamed_hosvd)
    svd: str = "exact"  # how the bases were found: "exact", "exact (Gram)", "randomized (ranks k1, k2)"
    kept_in: np.ndarray | None = None  # streamed: per-mode kept energies 0..R1 (exact up to k1, then linear)
    kept_out: np.ndarray | None = None

    @property
    def full(self) -> tuple[int, int]:
        """``(R1, R2)``: the ranks at which the factorization is exact."""
        return self.ranks if self.ranks is not None else (len(self.s_in), len(self.s_out))

    @property
    def sketch(self) -> tuple[int, int]:
        """``(k1, k2)``: the ranks the bases and the core hold (``full`` unless streamed and partial)."""
        return self.u_in.shape[1], self.u_out.shape[1]

    def kept_grid(self) -> np.ndarray:
        """``[R1 + 1, R2 + 1]``: fraction of ‖W‖² kept by ranks (r1, r2) (0 on row/column 0)."""
        e = np.einsum("hwij,hwij->ij", self.core, self.core, dtype=np.float64)
        grid = np.zeros((e.shape[0] + 1, e.shape[1] + 1))
        grid[1:, 1:] = e.cumsum(0).cumsum(1)
        if self.total <= 0:
            grid[1:, 1:] = 1.0
            return grid
        return np.minimum(grid / self.total, 1.0)


def mode_energy(h: Hosvd) -> tuple[np.ndarray, np.ndarray]:
    """Per-mode kept fractions of ‖W‖² at ranks 0..R1 and 0..R2 (past a streamed sketch: a lower bound)."""
    if h.kept_in is not None:
        return h.kept_in, h.kept_out
    return kept_energy(h.s_in), kept_energy(h.s_out)


def hosvd(kernel: np.ndarray, g: np.ndarray | None = None) -> Hosvd:
    """HOSVD of ``kernel [KH, KW, C, N]`` along modes C and N (float64); ``g [C, C]`` (symmetric)
    weights the input mode first: the decomposition is of ``W ×_C g``. Exact, through float64 copies of
    the kernel: for small kernels (:func:`streamed_hosvd` takes large ones)."""
    w = np.asarray(kernel, np.float64)
    if g is not None:
        w = np.einsum("dc,hwcn->hwdn", g, w, optimize=True)
    kh, kw, c, n = w.shape
    u_in, s_in, _ = np.linalg.svd(w.transpose(2, 0, 1, 3).reshape(c, -1), full_matrices=False)
    u_out, s_out, _ = np.linalg.svd(w.transpose(3, 0, 1, 2).reshape(n, -1), full_matrices=False)
    core = np.einsum("hwcn,ci,nj->hwij", w, u_in, u_out, optimize=True)
    return Hosvd(u_in, s_in, u_out, s_out, core, float(np.square(w).sum()))


def _mode_basis(t, full: int, rank: int | None, energy: float | None):
    """A :class:`~graphslim.analysis.randomized.PartialSvd` of ``t`` (streamed by rows): ``rank`` vectors
    (randomized unless ``rank`` is near ``full``), else enough for ``energy`` (sketches up to an eighth of
    ``full``, then exact), else all of them (exact, through the Gram matrix)."""
    if rank is not None:
        return randomized_svd(t, min(rank, full))
    if energy is not None:
        ps = top_svd(t, energy=energy, stop=max(FIRST_SKETCH, full // 8))
        if ps.exact or ps.kept()[ps.k] >= energy - 1e-12:
            return ps
    return randomized_svd(t, full)


def streamed_hosvd(kernel: np.ndarray, g: np.ndarray | None = None, *, ranks: tuple[int, int] | None = None,
                   energy: float | None = None) -> Hosvd:
    """HOSVD of a large ``kernel [KH, KW, C, N]`` without float64 copies of it (see the module docstring):
    bases of ranks ``ranks`` (each clipped to its mode's full rank), or enough to keep ``energy`` of each
    mode, or (neither) complete and exact. ``g`` as for :func:`hosvd` (the whitened kernel is formed once,
    in the kernel's floating precision)."""
    dt = np.float64 if kernel.dtype == np.float64 else np.float32
    w = kernel
    if g is not None:
        w = np.einsum("dc,hwcn->hwdn", g.astype(dt), np.asarray(kernel, dt), optimize=True)
    kh, kw, c, n = w.shape
    full = (min(c, kh * kw * n), min(n, kh * kw * c))
    slices = [w[i, j] for i in range(kh) for j in range(kw)]  # [C, N] views
    bases = []
    for mode, t in ((0, Stacked([s.T for s in slices])), (1, Stacked([w.reshape(-1, n)]))):
        ps = _mode_basis(t, full[mode], None if ranks is None else ranks[mode], energy)
        k = min(ps.k, full[mode])
        bases.append((ps, k))
    (p_in, k1), (p_out, k2) = bases
    u_in, u_out = p_in.vecs[:, :k1], p_out.vecs[:, :k2]
    a, b = u_in.astype(dt), u_out.astype(dt)
    core = np.stack([a.T @ (s @ b) for s in slices]).reshape(kh, kw, k1, k2)
    total = p_out.total
    kept = []
    for ps, f in ((p_in, full[0]), (p_out, full[1])):
        e = ps.kept()[:f + 1]
        e[-1] = 1.0
        kept.append(e)
    exact = p_in.exact and p_out.exact
    how = "exact (Gram)" if exact else f"randomized (ranks {k1}, {k2})"
    return Hosvd(u_in, p_in.s[:k1], u_out, p_out.s[:k2], core, total, ranks=full, svd=how,
                 kept_in=kept[0], kept_out=kept[1])


def tucker_factors(h: Hosvd, r1: int, r2: int, ginv: np.ndarray | None = None):
    """``(A [C, r1], core [KH, KW, r1, r2], B [r2, N])`` (float64) at ranks (r1, r2) of ``h``.

    ``ginv`` (``Σ^-½`` when ``h`` was whitened by ``Σ^½``) maps A back to the unwhitened input; A's
    columns are then scaled to unit norm, the core taking the scale (same product)."""
    a = h.u_in[:, :r1]
    core = h.core[:, :, :r1, :r2]
    b = h.u_out[:, :r2].T
    if ginv is not None:
        a = ginv @ a
        norms = np.linalg.norm(a, axis=0)
        norms = np.where(norms > 0, norms, 1.0)
        a, core = a / norms, core * norms[:, None]
    return a, core, b


def compose_tucker(a: np.ndarray, core: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The K×K kernel ``[KH, KW, C, N]`` equivalent to 1×1 ``a`` → K×K ``core`` → 1×1 ``b``."""
    return np.einsum("ci,hwij,jn->hwcn", a, core, b, optimize=True)


def tucker_error(kernel: np.ndarray, a: np.ndarray, core: np.ndarray, b: np.ndarray) -> float:
    """‖W − Ŵ‖ / ‖W‖ for Ŵ = 1×1 ``a`` → K×K ``core`` → 1×1 ``b``, slice by slice over the K×K taps (float64
    per ``[C, N]`` slice: no copy of the whole kernel)."""
    num = den = 0.0
    kh, kw = kernel.shape[:2]
    for i in range(kh):
        for j in range(kw):
            s = np.asarray(kernel[i, j], np.float64)
            num += float(np.square(s - a @ core[i, j] @ b).sum())
            den += float(np.square(s).sum())
    return float(np.sqrt(num / den)) if den else 0.0


def first_rank(kept: np.ndarray, fraction, tol: float = 1e-12):
    """The smallest rank r ≥ 1 whose kept fraction ``kept[r]`` (non-decreasing, ``kept[0]`` = 0) is at
    least ``fraction`` (a number or an array), else the full rank ``len(kept) - 1``."""
    r = np.searchsorted(np.asarray(kept)[1:], np.asarray(fraction) - tol, side="left") + 1
    return np.minimum(r, len(kept) - 1)


def energy_chain(e_in: np.ndarray, e_out: np.ndarray) -> list[tuple[int, int]]:
    """The rank pairs that keep the same energy fraction τ in both modes, τ from 0 to 1: each pair is
    (smallest r1 with ``e_in[r1]`` ≥ τ, smallest r2 with ``e_out[r2]`` ≥ τ); both grow along the list,
    which starts at (1, 1) and ends at full rank. ``e_in`` / ``e_out`` are per-mode kept energies
    0..R (:func:`~graphslim.analysis.factorize.kept_energy` of the mode spectra)."""
    taus = np.unique(np.concatenate([e_in[1:], e_out[1:]]))
    pairs = zip(first_rank(e_in, taus).tolist(), first_rank(e_out, taus).tolist())
    chain: list[tuple[int, int]] = []
    for p in pairs:
        if not chain or chain[-1] != p:
            chain.append(p)
    full = (len(e_in) - 1, len(e_out) - 1)
    if not chain or chain[-1] != full:
        chain.append(full)
    return chain
