"""randomized: the streamed SVD's error against the exact SVD's on a decaying spectrum, exactness at full
rank (the Gram fallback), energy-driven growth, wide matrices, and blocks over file-mapped weights."""

from __future__ import annotations

import numpy as np
import pytest

from graphslim.analysis import randomized
from graphslim.analysis.randomized import factored_error, frobenius_sq, randomized_svd, top_svd, use_randomized
from graphslim.ir import storage
from graphslim.ir.storage import map_array, mapping_of, row_blocks


def decaying(m=3000, n=120, scale=12.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.linalg.qr(rng.standard_normal((m, n)))[0]
    b = np.linalg.qr(rng.standard_normal((n, n)))[0]
    s = np.exp(-np.arange(n) / scale)
    return ((a * s) @ b.T).astype(np.float32), s


def best_error(s, k) -> float:
    return float(np.sqrt(np.square(s[k:]).sum() / np.square(s).sum()))


@pytest.mark.parametrize("k", [4, 16, 40])
def test_matches_exact_svd_error_within_a_small_factor(k):
    w, s = decaying()
    ps = randomized_svd(w, k)
    assert not ps.exact and ps.k == k
    u, v = ps.factors(w, k)
    assert u.dtype == np.float32 and u.shape == (3000, k) and v.shape == (k, 120)
    err = factored_error(w, u, v)
    assert best_error(s, k) <= err <= 1.05 * best_error(s, k) + 1e-6
    assert abs(np.sqrt(1 - ps.kept()[k]) - err) < 1e-4  # the kept energy is that of what is emitted


@pytest.mark.parametrize("k", [115, 120])
def test_full_rank_is_exact_through_the_gram_fallback(k):
    w, _ = decaying()
    ps = randomized_svd(w, k)
    assert ps.exact and ps.k == 120
    u, v = ps.factors(w, 120)
    assert factored_error(w, u, v) < 1e-5
    assert np.allclose(ps.s, np.linalg.svd(w.astype(np.float64), compute_uv=False), rtol=1e-5, atol=1e-7)
    assert ps.kept()[-1] == pytest.approx(1.0)


def test_wide_matrix_and_energy_growth():
    w, s = decaying()
    wt = np.ascontiguousarray(w.T)
    u, v = randomized_svd(wt, 16).factors(wt, 16)
    assert u.shape == (120, 16) and v.shape == (16, 3000)
    assert factored_error(wt, u, v) <= 1.05 * best_error(s, 16) + 1e-6
    ps = top_svd(w, energy=0.999)
    assert ps.kept()[ps.k] >= 0.999 and ps.k in (32, 64, 120)
    kept = ps.kept()
    assert len(kept) == 121 and np.all(np.diff(kept) >= -1e-12) and kept[-1] == pytest.approx(1.0)
    assert frobenius_sq(w) == pytest.approx(float(np.square(w.astype(np.float64)).sum()), rel=1e-6)


def test_threshold(monkeypatch):
    assert not use_randomized((3000, 120))
    monkeypatch.setattr(randomized, "RANDOMIZED_MIN_ENTRIES", 3000 * 120)
    assert use_randomized((3000, 120)) and not use_randomized((2999, 120))


def test_blocks_over_a_mapped_array(tmp_path, monkeypatch):
    w, s = decaying()
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 8 + w.tobytes())
    m = map_array(path, np.float32, w.shape, 8)
    assert mapping_of(m) is not None and not m.flags.writeable and np.array_equal(m, w)
    with pytest.raises(ValueError):
        m[0, 0] = 1.0  # a pass cannot change a loaded weight in place
    monkeypatch.setattr(storage, "BLOCK_BYTES", 4096 * 7)
    assert sum(len(b) for _, b in row_blocks(m)) == 3000
    u, v = randomized_svd(m, 8).factors(m, 8)
    assert factored_error(m, u, v) <= 1.05 * best_error(s, 8) + 1e-6
    assert np.array_equal(m, w)  # released pages read back from the file
