"""Which channels go: a ratio per group (from `ratio`, or from NNI's `config_list`), scored by a criterion,
rounded to a multiple of `round_to`, then removed from the graph in place.

`prune_graph(graph, spec)` returns the report: per group, its layers, its
channel count before and after, and why it was left alone where it was.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PruneError
from ..ir.graph import Graph, Node
from ..ir.ops import LAYERS, is_quantizer, layer_types
from .criteria import CRITERIA, scores
from .groups import ChannelGroups, Group, channel_groups, layer_path
from .shrink import shrink
from .taylor import taylor_saliency



@dataclass(frozen=True)
class PruneSpec:
    """What to prune: the default ratio, NNI-style per-layer entries, the criterion, the rounding, and layers
    never to prune (their names)."""

    ratio: float = 0.5
    criterion: str = "l2"
    round_to: int = 1
    config_list: tuple[dict, ...] = ()
    keep: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise PruneError(f"ratio={self.ratio!r} is not in [0, 1): it is the fraction of each group's channels "
                             "to remove (0.5 removes half)")
        if self.criterion not in CRITERIA:
            raise PruneError(f"unknown criterion {self.criterion!r}: use one of {', '.join(CRITERIA)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise PruneError(f"round_to={self.round_to!r} must be a positive int (channel counts stay multiples "
                             "of it)")


def kept_channels(size: int, ratio: float, round_to: int = 1) -> tuple[int, bool]:
    """How many of `size` channels a group keeps at `ratio`: floor(size * (1 - ratio)), as Torch-Pruning counts
    (an odd count loses the larger half), rounded up to a multiple of `round_to`; and whether the floor of
    round_to channels (size, if smaller) raised it."""
    keep = min(size, math.ceil(math.floor(size * (1 - ratio) + 1e-9) / round_to) * round_to)
    floor = min(size, round_to)
    return max(keep, floor), keep < floor


def kept_in_group(group: Group, ratio: float, round_to: int = 1) -> tuple[int, str | None]:
    """How many channels `group` keeps at `ratio`, the same number in each of its blocks (a grouped Conv's), so
    that it keeps a multiple of round_to and each block at least one; and a note where that floor raised it."""
    blocks = group.blocks
    keep, floored = kept_channels(group.size // blocks, ratio, round_to // math.gcd(round_to, blocks))
    if not floored:
        return keep * blocks, None
    return keep * blocks, (f"kept {keep * blocks} channels: a group keeps at least round_to={round_to}" if blocks == 1
                           else f"kept {keep * blocks} channels: each of its {blocks} blocks (a grouped Conv's) "
                           f"keeps {keep}")


def lowest(group: Group, score: np.ndarray, keep: int) -> np.ndarray:
    """The channels of `group` (sorted indices) that go for it to keep `keep`: the lowest scores of each block."""
    per_block, blocks = group.size // group.blocks, group.blocks
    order = np.argsort(np.reshape(score, (blocks, per_block)), axis=1, kind="stable")[:, :per_block - keep // blocks]
    return np.sort((order + per_block * np.arange(blocks)[:, None]).reshape(-1))


def layer_names(node: Node) -> set[str]:
    """The names a layer answers to: its node name, and its weight's module path (`layer1.0.conv1`)."""
    path = layer_path(node)
    return {node.name, path} if path else {node.name}


def resolve_config_list(graph: Graph, config_list: tuple[dict, ...] | list[dict]) -> tuple[dict[str, float], set[str]]:
    """NNI's config_list, applied in order (later entries override earlier ones): {layer name: ratio} and the
    names excluded."""
    layers = [n for n in graph if n.op_type in LAYERS and not n.domain]
    ratios: dict[str, float] = {}
    excluded: set[str] = set()
    for i, entry in enumerate(config_list):
        if not isinstance(entry, dict):
            raise PruneError(f"config_list[{i}] is a {type(entry).__name__}, not a dict such as "
                             "{'sparsity': 0.5, 'op_types': ['Conv2d']}")
        unknown = set(entry) - {"sparsity", "sparsity_per_layer", "ratio", "op_types", "op_names", "exclude"}
        if unknown:
            raise PruneError(f"config_list[{i}] has unknown keys {sorted(unknown)}: use sparsity (or ratio), "
                             "op_types, op_names and exclude")
        types, names = entry.get("op_types"), entry.get("op_names")
        matched = [n for n in layers if (types is None or layer_types(n) & set(types))
                   and (names is None or layer_names(n) & set(names))]
        if not matched:
            known = sorted({name for n in layers for name in layer_names(n)})
            wanted = list(names or []) + list(types or [])
            close = sorted({c for w in wanted for c in difflib.get_close_matches(str(w), known, n=3)})
            raise PruneError(f"config_list[{i}] ({entry}) matches no layer"
                             + (f"; closest names: {', '.join(close)}" if close else "")
                             + f". Layer types here: {', '.join(sorted({t for n in layers for t in layer_types(n)}))}")
        if entry.get("exclude"):
            excluded |= {n.name for n in matched}
            continue
        ratio = entry.get("sparsity", entry.get("sparsity_per_layer", entry.get("ratio")))
        PruneSpec(ratio=ratio)  # checks the range
        for n in matched:
            ratios[n.name] = float(ratio)
            excluded.discard(n.name)
    return ratios, excluded


@dataclass
class Plan:
    """What prune_graph removes: the groups, the channel indices leaving each (by group root), the report."""

    groups: ChannelGroups
    removed: dict[int, np.ndarray]
    report: list[dict[str, Any]]


def plan(graph: Graph, spec: PruneSpec, dataset: Any = None) -> Plan:
    """Which channels of `graph` go as `spec` says (the graph is not changed); `dataset` feeds the Taylor
    criterion."""
    quantized = [n for n in graph if is_quantizer(n)]
    if quantized:
        raise PruneError(f"the model is already quantized ({quantized[0].op_type} {quantized[0].name!r}): prune "
                         "the FP32 model, fine-tune it, then quantize")
    ratios, excluded = resolve_config_list(graph, spec.config_list) if spec.config_list else ({}, set())
    cg = channel_groups(graph, keep=set(spec.keep) | excluded)
    saliency = taylor_saliency(graph, dataset) if spec.criterion == "taylor" else None
    removed: dict[int, np.ndarray] = {}
    report = []
    for group in cg.groups():
        row = {"layers": group.names, "channels": group.size, "kept": group.size, "blocked": group.blocked,
               "note": None}
        report.append(row)
        if group.blocked is not None:
            continue
        ratio = min((ratios[n.name] for n in group.producers if n.name in ratios), default=spec.ratio)
        keep, row["note"] = kept_in_group(group, ratio, spec.round_to)
        if keep == group.size:
            continue
        removed[group.id] = lowest(group, scores(group, spec.criterion, cg.find, saliency), keep)
        row["kept"] = keep
    return Plan(cg, removed, report)


def prune_graph(graph: Graph, spec: PruneSpec, dataset: Any = None) -> list[dict[str, Any]]:
    """Prune `graph` in place as `spec` says; returns one report row per group."""
    chosen = plan(graph, spec, dataset)
    if chosen.removed:
        shrink(graph, chosen.groups, chosen.removed)
        graph.verify()
    return chosen.report
