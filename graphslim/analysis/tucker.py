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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Hosvd", "compose_tucker", "energy_chain", "first_rank", "hosvd", "tucker_factors"]


@dataclass(frozen=True)
class Hosvd:
    """The full HOSVD of a (possibly input-whitened) kernel: mode bases, mode spectra, full core."""

    u_in: np.ndarray  # [C, R1] orthonormal columns, R1 = min(C, KH·KW·N)
    s_in: np.ndarray  # [R1] singular values of the mode-C unfolding
    u_out: np.ndarray  # [N, R2] orthonormal columns, R2 = min(N, KH·KW·C)
    s_out: np.ndarray  # [R2]
    core: np.ndarray  # [KH, KW, R1, R2]
    total: float  # ‖W‖² (of the whitened kernel when whitened)

    @property
    def full(self) -> tuple[int, int]:
        """``(R1, R2)``: the ranks at which the factorization is exact."""
        return len(self.s_in), len(self.s_out)

    def kept_grid(self) -> np.ndarray:
        """``[R1 + 1, R2 + 1]``: fraction of ‖W‖² kept by ranks (r1, r2) (0 on row/column 0)."""
        e = np.square(self.core).sum((0, 1))
        grid = np.zeros((e.shape[0] + 1, e.shape[1] + 1))
        grid[1:, 1:] = e.cumsum(0).cumsum(1)
        if self.total <= 0:
            grid[1:, 1:] = 1.0
            return grid
        return np.minimum(grid / self.total, 1.0)


def hosvd(kernel: np.ndarray, g: np.ndarray | None = None) -> Hosvd:
    """HOSVD of ``kernel [KH, KW, C, N]`` along modes C and N (float64); ``g [C, C]`` (symmetric)
    weights the input mode first: the decomposition is of ``W ×_C g``."""
    w = np.asarray(kernel, np.float64)
    if g is not None:
        w = np.einsum("dc,hwcn->hwdn", g, w, optimize=True)
    kh, kw, c, n = w.shape
    u_in, s_in, _ = np.linalg.svd(w.transpose(2, 0, 1, 3).reshape(c, -1), full_matrices=False)
    u_out, s_out, _ = np.linalg.svd(w.transpose(3, 0, 1, 2).reshape(n, -1), full_matrices=False)
    core = np.einsum("hwcn,ci,nj->hwij", w, u_in, u_out, optimize=True)
    return Hosvd(u_in, s_in, u_out, s_out, core, float(np.square(w).sum()))


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
