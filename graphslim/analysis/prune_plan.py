"""A prune plan: what ``prune`` decided, as data that replays on another checkpoint of the same model.

``prune`` runs resolve targets → score → allocate → :class:`PrunePlan` → apply → reconstruct. The plan
is the hand-over between allocation and application: per channel group, which channels stay. It goes
into the pass's stats (``stats["plan"]``, hence into ``--report``) and ``prune{save_plan=plan.json}``
writes it; ``prune{plan=plan.json}`` skips scoring and allocation and applies it to the graph it is
given, e.g. the same architecture after more training, where the importance scores would have
picked other channels.

A group is identified by its weight members (checkpoint names like ``conv2d_1/kernel``, the axis that
shrinks, source or sink, the op types reading the weight, the weight's shape), not by its number
``g3`` (informative only) nor by activation node names (these may change between exports of the same
model). The kept channels are positions along the group's *anchor*, one source kernel's output axis
(``layer`` / ``axis``): ``conv2d_1/kernel`` keeps filters 0, 2, 5, …, as ``prune{layer="conv2d_1:keep=0,2,5"}``
would say it. A plan fits a graph when every group it lists is found there with exactly the same
weight members, shapes and ops; otherwise :meth:`PrunePlan.resolve` refuses, naming the plan file, the
group and layer, and the mismatch. The ``fingerprint`` hashes the members of all listed groups.

Example::

    plan = PrunePlan.load("plan.json")                 # a plan file, or a --report holding one
    changes = plan.resolve(g, channel_groups(g), where="plan.json")
    apply_keeps(g, changes)

The JSON (``to_json``)::

    {"format": "graphslim.prune_plan", "version": 1, "fingerprint": "sha256:5c0e…",
     "criterion": "l1", "options": {"ratio": 0.3},
     "groups": [{"group": "g1", "channels": 32, "layer": "conv2d_1/kernel", "axis": 3, "keep": [0, 2, …],
                 "members": [{"weight": "conv2d_1/kernel", "axis": 3, "role": "source",
                              "ops": ["Conv2D"], "shape": [3, 3, 16, 32]}, …]}]}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from graphslim.analysis.channels import ChannelGroup, Member
from graphslim.errors import PassError
from graphslim.fileio import write_text_atomic
from graphslim.ir.graph import Tensor

PLAN_FORMAT = "graphslim.prune_plan"
PLAN_VERSION = 1

_ADVICE = ("A plan replays a prune on another checkpoint of the same architecture (same layers, shapes "
           "and ops, e.g. after more training) after the same passes (e.g. fold-batchnorm before prune "
           "both times); for another model, prune it with a target (ratio=, macs=, threshold=, layer=) "
           "and save_plan= a new plan.")


@dataclass(frozen=True)
class PlanMember:
    """One weight slice of a planned group: ``weight`` (checkpoint name) along ``axis``, its ``role``
    (``source``, ``sink`` or None), the op types reading it and its shape before pruning."""

    weight: str
    axis: int
    role: str | None
    ops: tuple[str, ...]
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"weight": self.weight, "axis": self.axis, "role": self.role, "ops": list(self.ops),
                "shape": list(self.shape)}


@dataclass(frozen=True)
class PlanGroup:
    """One group of the plan: ``channels`` group channels, ``keep`` the kept positions along the
    anchor ``layer``'s ``axis`` (sorted), ``members`` its weight slices; ``group`` is the group's name
    in the model the plan was made on (informative)."""

    group: str
    channels: int
    layer: str
    axis: int
    keep: tuple[int, ...]
    members: tuple[PlanMember, ...]

    def label(self) -> str:
        return f"group {self.group} (layer {self.layer})"

    def to_json(self) -> dict:
        return {"group": self.group, "channels": self.channels, "layer": self.layer, "axis": self.axis,
                "keep": list(self.keep), "members": [m.to_json() for m in self.members]}


@dataclass(frozen=True)
class PrunePlan:
    """Kept channels per group, the criterion and options that chose them, and the fingerprint of the
    groups' members. See the module docstring."""

    groups: tuple[PlanGroup, ...] = ()
    criterion: str = ""
    options: dict = field(default_factory=dict)
    fingerprint: str = ""

    # ------------------------------------------------------------------ making
    @classmethod
    def from_changes(cls, graph, changes: Sequence[tuple], criterion: str = "",
                     options: dict | None = None) -> "PrunePlan":
        """The plan of ``changes`` (``(group, keep)`` pairs computed on ``graph``, before they are
        applied). Example::

            plan = PrunePlan.from_changes(g, [(grp, [0, 2, 5])], criterion="l1", options={"ratio": 0.5})
        """
        groups = []
        for grp, keep in changes:
            anchor = _anchor(grp)
            positions = sorted({int(p) for c in keep for p in anchor.index_map[int(c)]})
            groups.append(PlanGroup(group=grp.name, channels=int(grp.size), layer=anchor.name,
                                    axis=int(anchor.axis), keep=tuple(positions),
                                    members=_members(graph, grp)))
        return cls(groups=tuple(groups), criterion=criterion, options=dict(options or {}),
                   fingerprint=fingerprint([g.members for g in groups]))

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        """A JSON-ready dict (the pass's ``stats["plan"]`` and the plan file)."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "fingerprint": self.fingerprint,
                "criterion": self.criterion, "options": dict(self.options),
                "groups": [g.to_json() for g in self.groups]}

    @classmethod
    def from_json(cls, data: Any, where: str = "the plan") -> "PrunePlan":
        """The plan in ``data``: a :meth:`to_json` dict, or a ``--report`` dict whose passes hold
        exactly one prune plan. Raises :class:`PassError` naming ``where`` when it is neither."""
        if isinstance(data, dict) and "format" not in data and isinstance(data.get("passes"), list):
            found = [p["stats"]["plan"] for p in data["passes"] if isinstance(p, dict)
                     and isinstance(p.get("stats"), dict) and isinstance(p["stats"].get("plan"), dict)]
            if len(found) != 1:
                raise PassError(f"prune: plan file {where} is a report with {len(found)} prune plans; "
                                f"extract one (the 'plan' of a prune pass's stats) into its own file")
            data = found[0]
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PassError(f"prune: plan file {where} is not a prune plan (a JSON object with \"format\": "
                            f"\"{PLAN_FORMAT}\", written by prune{{save_plan=...}} or found under "
                            f"passes[i].stats.plan of a --report)")
        if data.get("version") != PLAN_VERSION:
            raise PassError(f"prune: plan file {where} has version {data.get('version')!r}; this graphslim "
                            f"reads version {PLAN_VERSION}")
        try:
            groups = tuple(_group_from_json(g) for g in data["groups"])
            return cls(groups=groups, criterion=str(data.get("criterion", "")),
                       options=dict(data.get("options") or {}), fingerprint=str(data["fingerprint"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PassError(f"prune: plan file {where} is damaged: {type(exc).__name__}: {exc} (a group "
                            f"needs group, channels, layer, axis, keep and members)") from None

    @classmethod
    def load(cls, path) -> "PrunePlan":
        """Read a plan file (or a report holding one plan)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PassError(f"prune: cannot read plan file {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PassError(f"prune: plan file {path} is not JSON: {exc}") from None
        return cls.from_json(data, where=str(path))

    def save(self, path, inputs: Sequence = ()) -> None:
        """Write the plan as JSON to ``path`` atomically (a temporary sibling, then a rename). Refuses a
        path that is one of ``inputs`` or lies inside one (see :func:`check_plan_path`)."""
        check_plan_path(path, inputs)
        path = Path(path)
        text = _compact_lists(json.dumps(self.to_json(), indent=1, allow_nan=False)) + "\n"
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise PassError(f"prune: cannot write the plan {path}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------------ replaying
    def resolve(self, graph, groups: Sequence[ChannelGroup], where: str = "the plan") -> list:
        """The ``(group, keep)`` changes this plan makes on ``graph`` (whose channel groups are
        ``groups``), in group order, ready for :func:`~graphslim.analysis.channels.apply_keeps`.
        Raises :class:`PassError` naming ``where``, the group and layer and the mismatch when the plan
        does not fit: a layer missing, a different channel count, op or shape, channels coupled
        differently, a group that cannot be pruned here."""
        def refuse(pg: PlanGroup, what: str) -> PassError:
            return PassError(f"prune: plan {where} does not fit this model: {pg.label()}: {what}. {_ADVICE}")

        changes, used = [], {}
        matched = []
        for pg in self.groups:
            if pg.layer not in graph.weights:
                raise refuse(pg, f"the model has no layer {pg.layer}")
            covering = [g for g in groups if g.covers(Tensor(pg.layer, 0), pg.axis)]
            planned = {(m.weight, m.axis) for m in pg.members}
            grp = next((g for g in covering if g.size == pg.channels and planned == {
                (m.name, m.axis) for m in g.members_of("weight")}), covering[0] if covering else None)
            if grp is None:
                raise refuse(pg, f"axis {pg.axis} of {pg.layer} belongs to no channel group of the model")
            anchor_plan = next((m for m in pg.members if (m.weight, m.axis) == (pg.layer, pg.axis)), None)
            here = {(m.weight, m.axis): m for m in _members(graph, grp)}
            if anchor_plan is not None and here.get((pg.layer, pg.axis)) is not None \
                    and anchor_plan.ops != here[(pg.layer, pg.axis)].ops:
                raise refuse(pg, f"{pg.layer} is read by {_ops(anchor_plan.ops)} in the plan, by "
                                 f"{_ops(here[(pg.layer, pg.axis)].ops)} in the model")
            if grp.size != pg.channels:
                raise refuse(pg, f"the plan's group has {pg.channels} channels, the model's ({grp.name}) has "
                                 f"{grp.size}")
            _check_members(pg, here, graph, refuse)
            if not grp.prunable:
                raise refuse(pg, f"the model's group {grp.name} cannot be pruned: {grp.why_not()}")
            if grp.id in used:
                raise refuse(pg, f"it is the same channel group of the model ({grp.name}) as "
                                 f"{used[grp.id].label()} of the plan")
            used[grp.id] = pg
            anchor = grp.member(pg.layer, pg.axis)
            try:
                keep = group_channels(anchor, grp.size, pg.keep)
            except ValueError as exc:
                raise refuse(pg, f"keep: {exc}") from None
            if not keep:
                raise refuse(pg, "it keeps no channel")
            changes.append((grp, keep))
            matched.append(tuple(here[(m.weight, m.axis)] for m in pg.members))
        got = fingerprint(matched)
        if got != self.fingerprint:
            raise PassError(f"prune: plan {where}: its fingerprint {self.fingerprint} does not match the "
                            f"layers it lists ({got}): the file was edited or truncated; make the plan again")
        changes.sort(key=lambda c: c[0].id)
        return changes


# ----------------------------------------------------------------------------------------- helpers
def fingerprint(member_lists: Sequence[Sequence[PlanMember]]) -> str:
    """``sha256:`` of the groups' members (weight, axis, role, reading ops, shape), in plan order."""
    text = json.dumps([[m.to_json() for m in ms] for ms in member_lists], sort_keys=True,
                      separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def group_channels(member: Member, size: int, positions: Sequence[int]) -> list[int]:
    """Positions along ``member``'s axis → the group channels (of ``size``) owning them, sorted. Each
    position must belong to a channel and the positions must cover whole channels; raises ValueError
    saying which does not."""
    owner = {}
    for c in range(size):
        for p in member.index_map[c]:
            owner[int(p)] = c
    out = []
    for p in positions:
        if int(p) not in owner:
            raise ValueError(f"channel {p} is out of range (the layer has {member.dim} channels)")
        c = owner[int(p)]
        if c not in out:
            out.append(c)
    if sum(len(member.index_map[c]) for c in out) != len({int(p) for p in positions}):
        raise ValueError(f"the kept channels must cover whole group channels (each group channel spans "
                         f"{member.index_map.width} positions of this layer)")
    return sorted(out)


def check_plan_path(path, inputs: Sequence = ()) -> None:
    """Refuse to write a plan to ``path`` when it is one of ``inputs`` (files or directories: the
    model, the plan read, the calibration data) or inside one, is a directory, or its directory is
    missing."""
    p = Path(path)
    resolved = p.resolve()
    for given in inputs:
        if not given:
            continue
        src = Path(given).resolve()
        if resolved == src or src in resolved.parents:
            raise PassError(f"prune: save_plan={path} is {'inside ' if resolved != src else ''}{given}, an "
                            f"input of this run; writing it would change the input. Save the plan elsewhere")
    if p.is_dir():
        raise PassError(f"prune: save_plan={path} is a directory; give a file name like plan.json")
    if not p.parent.is_dir():
        raise PassError(f"prune: cannot write the plan {path}: the directory {p.parent} does not exist")


def _anchor(grp: ChannelGroup) -> Member:
    """The weight member the kept channels are indexed along: a source kernel whose axis is exactly the
    group's channels if there is one, else the first source, else the first weight member."""
    weights = grp.members_of("weight")
    sources = [m for m in weights if m.role == "source"]
    for m in sources:
        rows = m.index_map.rows
        if m.index_map.width == 1 and m.dim == grp.size and np.array_equal(rows[:, 0], np.arange(grp.size)):
            return m
    if sources or weights:
        return (sources or weights)[0]
    raise PassError(f"prune: channel group {grp.name} has no weight to index its channels by; it cannot be "
                    f"recorded in a plan")


def _members(graph, grp: ChannelGroup) -> tuple[PlanMember, ...]:
    out = []
    for m in grp.members_of("weight"):
        ops = tuple(sorted({node.op for node, _ in graph.weight_readers(m.name)}))
        out.append(PlanMember(weight=m.name, axis=int(m.axis), role=m.role, ops=ops,
                              shape=tuple(int(d) for d in graph.weights[m.name].value.shape)))
    return tuple(sorted(out, key=lambda m: (m.weight, m.axis)))


def _check_members(pg: PlanGroup, here: dict, graph, refuse) -> None:
    planned = {(m.weight, m.axis): m for m in pg.members}
    for key, m in planned.items():
        got = here.get(key)
        if got is None:
            if m.weight not in graph.weights:
                raise refuse(pg, f"the model has no layer {m.weight}")
            raise refuse(pg, f"axis {m.axis} of {m.weight} is not in this group in the model (its channels "
                             f"are coupled differently)")
        if got.ops != m.ops:
            raise refuse(pg, f"{m.weight} is read by {_ops(m.ops)} in the plan, by {_ops(got.ops)} in the model")
        if got.shape != m.shape:
            raise refuse(pg, f"{m.weight} has shape {list(m.shape)} in the plan, {list(got.shape)} in the model")
        if got.role != m.role:
            raise refuse(pg, f"{m.weight} axis {m.axis} is a {m.role or 'member'} of the group in the plan, "
                             f"a {got.role or 'member'} in the model")
    extra = sorted(k for k in here if k not in planned)
    if extra:
        w, a = extra[0]
        raise refuse(pg, f"the model's group also holds axis {a} of {w}, which the plan's does not (its "
                         f"channels are coupled differently)")


def _compact_lists(text: str) -> str:
    """Indented JSON with lists of scalars (keep lists, shapes) on one line; only whitespace between
    tokens changes (a JSON string never holds a raw newline)."""
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)


def _ops(ops: tuple) -> str:
    return "+".join(ops) if ops else "nothing"


def _group_from_json(g: dict) -> PlanGroup:
    members = tuple(PlanMember(weight=str(m["weight"]), axis=int(m["axis"]),
                               role=None if m.get("role") is None else str(m["role"]),
                               ops=tuple(str(o) for o in m["ops"]), shape=tuple(int(d) for d in m["shape"]))
                    for m in g["members"])
    keep = [int(k) for k in g["keep"]]
    if sorted(set(keep)) != keep:
        raise ValueError(f"keep of group {g.get('group')} is not sorted and unique")
    return PlanGroup(group=str(g["group"]), channels=int(g["channels"]), layer=str(g["layer"]),
                     axis=int(g["axis"]), keep=tuple(keep), members=members)
