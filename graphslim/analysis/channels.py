"""Channel-dependency analysis: what must shrink together when one axis of one tensor shrinks.

A :class:`ChannelGroup` is everything tied to one channel axis: the weight slices that produce the
channels (a conv's output filters: the *sources*), the per-channel weights and constants applied to
them (bias, batch norm, ``Mul`` by a scale), the activations that carry them (coupled through residual
``Add``, ``Concat`` with offsets, depthwise convs, ``Reshape``/``Flatten``, ``Transpose``...) and the
weight slices that read them (the next conv's input channels: the *sinks*). Each member has an
:class:`IndexMap`: for every group channel ``c``, the positions along that member's axis that belong to
``c`` (one for a plain op; all spatial positions for Flatten→Dense; ``c·m … c·m+m−1`` after a depthwise
conv with multiplier ``m``; shifted by an offset after Concat; none for a Concat input that holds other
channels).

The analysis walks the graph in both directions from a seed (tensor, axis). What each op does with an
axis is a *rule* in a registry (``@channel_rule("Conv2D")``): given the (port, axis, index map) at which
the walk reaches the op, it returns the other ports and axes the channels continue to. An op without a
rule, or a rule that cannot carry the axis (a Split on the channel axis, a Reshape that splits it...),
*blocks* the group with a reason; nothing is guessed. A map may be partial (the group seeded on one
Concat input knows only its own positions of the Concat output); maps reaching the same (tensor, axis)
by different paths merge, and a contradiction (one position claimed by two channels) blocks as an
"inconsistent channel mapping". The same groups serve ``subset`` (seed: an output's class axis, keep an
explicit list) and ``prune`` (seed: every conv/matmul output, keep the important channels; all groups
in one :func:`apply_keeps`).

Example::

    from graphslim.analysis.channels import apply_keep, channel_groups, format_groups, group_for
    g = graphslim.load("resnet/")
    print(format_groups(channel_groups(g)))        # one line per group: size, sources, prunable or why not
    head = group_for(g, g.outputs[0].tensor, -1)   # the class axis of the first output
    apply_keep(g, head, [3, 7, 1])                 # classes 3, 7, 1, in that order

Static shapes must be current (the loader and every pass leave them so; else ``graph.infer_shapes()``).

This module is the public face; the code lives in :mod:`~graphslim.analysis.channel_maps` (index maps),
:mod:`~graphslim.analysis.channel_rules` (the per-op rules), :mod:`~graphslim.analysis.channel_groups` (the
walk and its groups) and :mod:`~graphslim.analysis.channel_apply` (keeping and adding channels).
"""

from __future__ import annotations

from graphslim.analysis.channel_apply import apply_grow, apply_grows, apply_keep, apply_keeps, pick_vectors
from graphslim.analysis.channel_groups import (Blocker, ChannelGroup, Member, Pick, channel_groups, format_groups,
                                               group_for, hidden_size)
from graphslim.analysis.channel_maps import Blocked, ChannelError, In, IndexMap, Link, Out, combined_positions
from graphslim.analysis.channel_rules import CHANNEL_RULES, channel_rule, elementwise_rule

__all__ = ["ChannelError", "Blocked", "IndexMap", "Link", "In", "Out", "Member", "Blocker", "ChannelGroup",
           "CHANNEL_RULES", "channel_rule", "elementwise_rule", "group_for", "channel_groups", "apply_keep", "apply_keeps",
           "combined_positions", "format_groups", "apply_grow", "apply_grows", "Pick", "pick_vectors", "hidden_size"]
