"""Index maps: which positions along one axis of one member belong to each channel of a group.

The data half of the channel analysis (:mod:`graphslim.analysis.channels`): :class:`IndexMap` and the
operations channel rules use to carry a map through an op (shift, restrict, expand, collapse,
relabel), plus the :class:`Link` a rule returns and the errors (:class:`Blocked`, :class:`ChannelError`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from graphslim.errors import PassError

__all__ = ["ChannelError", "Blocked", "IndexMap", "combined_positions", "normalize_map", "map_from_labels",
           "check_map", "merge_maps", "shift_map", "restrict_map", "expand_map", "collapse_map", "Link", "In",
           "Out"]


class ChannelError(PassError):
    """A channel group cannot be changed as asked (blocked group, bad keep list, stale group)."""


class Blocked(Exception):
    """Raised by a channel rule: the op cannot carry this axis. The message says why."""


# ----------------------------------------------------------------------------------------- index maps
class IndexMap:
    """For each of the ``C`` group channels, the positions along one axis of one member.

    Stored as an int64 array ``rows`` of shape ``[C, k]``: row ``c`` lists channel ``c``'s ``k``
    positions in ascending order, or is all ``-1`` when channel ``c`` has no position on this axis.
    Non-empty rows are translates of each other (``rows[c] - rows[c][0]`` is the same for every c):
    sub-index ``j`` is the same "rest" coordinate (spatial position, anchor, multiplier slot) for all
    channels, which is what makes reordering channels well defined.

    Example: a conv with 3 output channels flattened from a 2×2 feature map into a Dense layer: the
    Dense kernel's axis 0 has ``IndexMap([[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])``.
    """

    __slots__ = ("rows",)

    def __init__(self, rows):
        arr = np.array(rows, dtype=np.int64)
        if arr.ndim == 1:
            arr = arr[:, None]
        arr.setflags(write=False)
        self.rows = arr

    @classmethod
    def identity(cls, n: int) -> "IndexMap":
        return cls(np.arange(n)[:, None])

    @property
    def size(self) -> int:
        """Number of group channels ``C``."""
        return self.rows.shape[0]

    @property
    def width(self) -> int:
        """Positions per (present) channel."""
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, c: int) -> np.ndarray:
        """The positions of group channel ``c`` (empty if it has none on this axis)."""
        r = self.rows[c]
        return r[r >= 0]

    @property
    def present(self) -> np.ndarray:
        """Boolean mask: which group channels have positions on this axis."""
        return self.rows[:, 0] >= 0

    def covered(self) -> np.ndarray:
        """All positions that belong to some group channel, ascending."""
        return np.sort(self.rows[self.rows >= 0])

    def tolist(self) -> list[list[int]]:
        return [self[c].tolist() for c in range(self.size)]

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexMap) and self.rows.shape == other.rows.shape and bool(
            np.array_equal(self.rows, other.rows))

    __hash__ = None

    def __repr__(self) -> str:
        if self.width == 1 and np.array_equal(self.rows[:, 0], np.arange(self.size)):
            return f"IndexMap(identity {self.size})"
        head = ", ".join(str(r) for r in self.tolist()[:4])
        return f"IndexMap(C={self.size}, k={self.width}: {head}{', ...' if self.size > 4 else ''})"

    def positions(self, keep: Sequence[int], dim: int) -> np.ndarray:
        """Old positions, in new order, along an axis of length ``dim`` after keeping group channels
        ``keep`` (in that order).

        Positions of no group channel stay where they are; those of removed channels go. For a sorted
        ``keep`` this is just the surviving positions in ascending order. For a reordering, each slot
        that held channel ``sorted(keep)[i]`` (sub-index ``j``) now holds channel ``keep[i]`` (same
        ``j``): the layout of the axis is unchanged except for which channel sits where. Raises
        ValueError when the order cannot be realized on this axis (e.g. it would move a channel from
        one Concat input into another's range).
        """
        return combined_positions(dim, [(self, keep)])


def combined_positions(dim: int, parts: Sequence[tuple]) -> np.ndarray:
    """Old positions, in new order, along an axis of length ``dim`` shared by several groups: ``parts``
    is a list of ``(IndexMap, keep)``, one per group, owning disjoint positions (e.g. the branches of a
    Concat), or positions that index a product of their channels (a ``[in, heads·head_dim]`` attention
    kernel: position ``n·H + h`` belongs to head ``n`` and to head-size channel ``h``; it stays when both
    keep theirs). Positions no group owns stay in place. See :meth:`IndexMap.positions`."""
    owner = np.full(dim, -1, dtype=np.int64)  # part index
    chan = np.full(dim, -1, dtype=np.int64)
    sub = np.zeros(dim, dtype=np.int64)
    kept = np.ones(dim, dtype=bool)
    shared = np.zeros(dim, dtype=bool)
    for i, (imap, keep) in enumerate(parts):
        rows = imap.rows
        valid = rows >= 0
        pos = rows[valid]
        shared[pos] |= owner[pos] >= 0
        c_idx, j_idx = np.nonzero(valid)
        owner[pos], chan[pos], sub[pos] = i, c_idx, j_idx
        keep_mask = np.zeros(imap.size, dtype=bool)
        keep_mask[np.asarray(keep, dtype=np.int64)] = True
        kept[pos] &= keep_mask[c_idx]
    out = np.arange(dim)[kept]
    for i, (imap, keep) in enumerate(parts):
        keep = np.asarray(keep, dtype=np.int64)
        skeep = np.sort(keep)
        if np.array_equal(skeep, keep):
            continue
        if shared[imap.covered()].any():
            raise ValueError("the channels share their positions with another group's: they can be removed "
                             "but not reordered on this axis")
        present = imap.present
        bad = np.nonzero(present[skeep] != present[keep])[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"group channel {int(keep[j])} cannot take the place of channel {int(skeep[j])}: "
                             f"only one of them has positions on this axis (e.g. they come from different "
                             f"Concat inputs); keep them in an order that leaves each part's channels together")
        rank = np.zeros(imap.size, dtype=np.int64)
        rank[skeep] = np.arange(len(skeep))
        mine = owner[out] == i
        q = out[mine]
        out[mine] = imap.rows[keep[rank[chan[q]]], sub[q]]
    return out


def normalize_map(rows, what: str = "this axis") -> IndexMap:
    """Rows with -1 holes → an IndexMap (each row sorted, empty rows all -1); every non-empty row must
    have the same number of positions."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim == 1:
        rows = rows[:, None]
    valid = rows >= 0
    counts = valid.sum(axis=1)
    widths = np.unique(counts[counts > 0])
    if widths.size > 1:
        raise Blocked(f"group channels cover different numbers of positions on {what} "
                      f"({', '.join(str(int(w)) for w in widths)})")
    k = int(widths[0]) if widths.size else 1
    big = np.iinfo(np.int64).max
    s = np.sort(np.where(valid, rows, big), axis=1)[:, :k]
    s[s == big] = -1
    return IndexMap(s)


def map_from_labels(labels: np.ndarray, size: int, what: str) -> IndexMap:
    """``labels[q]`` = group channel owning position q (or -1) → IndexMap."""
    pos = np.nonzero(labels >= 0)[0]
    lab = labels[pos]
    counts = np.bincount(lab, minlength=size)
    widths = np.unique(counts[counts > 0])
    if widths.size > 1:
        raise Blocked(f"group channels cover different numbers of positions on {what}")
    k = int(widths[0]) if widths.size else 1
    rows = np.full((size, k), -1, dtype=np.int64)
    order = np.lexsort((pos, lab))
    lab, pos = lab[order], pos[order]
    if pos.size:
        rows[lab, np.arange(pos.size) - np.repeat(np.cumsum(counts) - counts, counts)] = pos
    return IndexMap(rows)


def check_map(imap: IndexMap, dim: int) -> None:
    """Raise Blocked unless ``imap`` fits an axis of length ``dim`` (no shared positions, regular layout)."""
    rows = imap.rows
    pos = rows[rows >= 0]
    if pos.size and (pos.max() >= dim):
        raise Blocked(f"channel positions up to {int(pos.max())} on an axis of length {dim}")
    if np.unique(pos).size != pos.size:
        raise Blocked("two group channels share a position on this axis")
    full = rows[imap.present]
    if len(full) > 1:
        rel = full - full[:, :1]
        if not (rel == rel[0]).all():
            raise Blocked("irregular channel layout (channels' positions are not translates of each other)")


def merge_maps(a: IndexMap, b: IndexMap) -> IndexMap:
    """Union of two maps of the same group channels (each channel's positions from both)."""
    if a.size != b.size:
        raise Blocked(f"maps of {a.size} and {b.size} channels")
    both = np.sort(np.concatenate([a.rows, b.rows], axis=1), axis=1)
    dup = np.zeros_like(both, dtype=bool)
    dup[:, 1:] = both[:, 1:] == both[:, :-1]
    return normalize_map(np.where(dup, -1, both))


def shift_map(imap: IndexMap, delta: int) -> IndexMap:
    """Every position moved by ``delta`` (a Concat input's offset in the output)."""
    return IndexMap(np.where(imap.rows >= 0, imap.rows + delta, -1))


def restrict_map(imap: IndexMap, lo: int, hi: int, what: str) -> IndexMap:
    """Only the positions in ``[lo, hi)``, renumbered from 0 (one Concat input, one slice's range)."""
    r = imap.rows
    return normalize_map(np.where((r >= lo) & (r < hi), r - lo, -1), what)


def expand_map(imap: IndexMap, mult: int) -> IndexMap:
    """Each position i → positions i·mult … i·mult+mult−1 (depthwise multiplier)."""
    r = imap.rows
    out = (r[:, :, None] * mult + np.arange(mult)).reshape(r.shape[0], -1)
    return normalize_map(np.where(np.repeat(r >= 0, mult, axis=1), out, -1))


def collapse_map(imap: IndexMap, mult: int) -> IndexMap:
    """Inverse of :func:`expand_map`; every channel must own whole blocks of ``mult`` positions."""
    r = imap.rows
    if mult == 1:
        return imap
    if r.shape[1] % mult:
        raise Blocked(f"group channels split the depthwise multiplier blocks of {mult}")
    blocks = r.reshape(r.shape[0], -1, mult)
    base = blocks[:, :, :1]
    ok = (blocks < 0).all(axis=2) | ((base % mult == 0) & (blocks == base + np.arange(mult))).all(axis=2)
    if not ok.all():
        raise Blocked(f"group channels split the depthwise multiplier blocks of {mult}")
    return normalize_map(np.where(base[:, :, 0] >= 0, base[:, :, 0] // mult, -1))


# ----------------------------------------------------------------------------------------- rule API
class Link(NamedTuple):
    """One end of a channel relation at a node: input or output ``port``, ``axis`` and index map.

    ``role`` marks weight positions: ``"source"`` (the slice that produces the channels, e.g. a conv
    kernel's output axis) or ``"sink"`` (the slice that reads them, e.g. the next kernel's input axis).
    """

    io: str  # "in" | "out"
    port: int
    axis: int
    imap: IndexMap
    role: str | None = None


def In(port: int, axis: int, imap: IndexMap, role: str | None = None) -> Link:
    return Link("in", port, axis, imap, role)


def Out(port: int, axis: int, imap: IndexMap, role: str | None = None) -> Link:
    return Link("out", port, axis, imap, role)
