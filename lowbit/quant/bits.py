"""Bit widths per quantizer: defaults for weights and activations, and per-layer overrides, 2 to 8 bits.

    Bits.of({"weights": 4, "activations": 8,
             "layers": {"conv1": {"weights": 8}, "{re}.*classifier.*": {"weights": 8, "activations": 8}}})

Without an entry a quantizer keeps the bits of the hardware config's quantizer. Layers are named as the text
form prints them (`print(lowbit.lower(model))`) or by their module path (`layer1.0.conv1`), by a regular
expression with NNCF's `{re}` prefix, or by type with `{type}` (`{type}Conv2d`, `{type}Gemm`); later
entries override earlier ones, and every entry must match a layer (IgnoredScope's check, with the closest
names). A weight quantizer takes its layer's bits; an activation quantizer the widest its reading layers ask
for (one grid feeds them all); a unified-scale group (a Concat's inputs) the widest of its members.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import IgnoredScopeError, OptionError
from ..ir.graph import Graph
from ..ir.ops import layer_path, layer_types
from .scope import nncf_scope

KINDS = ("weights", "activations")
MIN_BITS, MAX_BITS = 2, 8
TYPE_PREFIX = "{type}"


def check_bits(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
        raise OptionError(f"{where} = {value!r}: bits are an int from {MIN_BITS} to {MAX_BITS}")
    return value


def _kinds(spec: Any, where: str) -> dict[str, int]:
    if not isinstance(spec, dict):
        raise OptionError(f"{where} is a {type(spec).__name__}: give a dict such as {{'weights': 4}}")
    unknown = sorted(set(spec) - set(KINDS))
    if unknown:
        raise OptionError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(KINDS)}")
    return {kind: check_bits(b, f"{where}[{kind!r}]") for kind, b in spec.items() if b is not None}


def resolve_layers(graph: Graph, name: str, where: str) -> set[str]:
    """The node names `name` selects: a node name, a layer's module path (`layer1.0.conv1`), a regular
    expression after NNCF's `{re}` prefix, or a type after `{type}` (an IR op or a torch module class, `Conv2d`);
    an OptionError at `where` (with the closest names) when it selects nothing."""
    if name.startswith(TYPE_PREFIX):
        wanted = name[len(TYPE_PREFIX):]
        hits = {n.name for n in graph if wanted in layer_types(n)}
        if not hits:
            known = sorted({t for n in graph if layer_path(n) for t in layer_types(n)})
            raise OptionError(f"{where}: no layer of type {wanted!r}; the layer types here are {', '.join(known)}")
        return hits
    by_path = {layer_path(n): n.name for n in graph if layer_path(n)}
    if name in by_path and name not in {n.name for n in graph}:
        return {by_path[name]}
    try:
        return nncf_scope([name]).resolve(graph)
    except IgnoredScopeError as e:
        raise OptionError(f"{where}: {str(e).replace('ignored scope ', '', 1)}") from None


@dataclass(frozen=True)
class Bits:
    weights: int | None = None
    activations: int | None = None
    layers: tuple[tuple[str, dict[str, int]], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, value: Any) -> Bits | None:
        """`value` (None, a Bits, or the dict form above) as Bits; an OptionError names a bad entry."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise OptionError(f"bits is a {type(value).__name__}: give a dict such as "
                              "{'weights': 4, 'activations': 8, 'layers': {'conv1': {'weights': 8}}}")
        layers = value.get("layers") or {}
        if not isinstance(layers, dict):
            raise OptionError(f"bits['layers'] is a {type(layers).__name__}: map layer names (or '{{re}}regex') "
                              "to {'weights': n, 'activations': n}")
        defaults = _kinds({k: v for k, v in value.items() if k != "layers"}, "bits")
        return cls(defaults.get("weights"), defaults.get("activations"),
                   tuple((str(name), _kinds(spec, f"bits['layers'][{name!r}]")) for name, spec in layers.items()))

    def to_dict(self) -> dict:
        out: dict[str, Any] = {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}
        if self.layers:
            out["layers"] = {name: dict(spec) for name, spec in self.layers}
        return out

    def layer_bits(self, graph: Graph) -> dict[str, dict[str, int]]:
        """Per node name, the bits its entries set (later entries win)."""
        chosen: dict[str, dict[str, int]] = {}
        for name, spec in self.layers:
            for hit in resolve_layers(graph, name, f"bits['layers'][{name!r}]"):
                chosen.setdefault(hit, {}).update(spec)
        return chosen

    def apply(self, graph: Graph, points: list) -> list:
        """`points` (quant.placement.QuantPoint) with their configs' bits replaced as this says."""
        per_layer = self.layer_bits(graph)

        def wanted(p) -> int | None:
            kind = "weights" if p.kind == "weight" else "activations"
            layers = [n.name for n, _ in p.consumers] if p.kind == "weight" else p.layers
            asked = [per_layer[name][kind] for name in layers if kind in per_layer.get(name, {})]
            return max(asked) if asked else getattr(self, kind)

        bits = {id(p): wanted(p) for p in points}
        groups: dict[int, int] = {}
        for p in points:
            if p.group is not None and bits[id(p)] is not None:
                groups[p.group] = max(groups.get(p.group, 0), bits[id(p)])
        out = []
        for p in points:
            b = groups.get(p.group, bits[id(p)]) if p.group is not None else bits[id(p)]
            if b is None or b == p.config.bits:
                out.append(p)
            else:
                config = dataclasses.replace(p.config, bits=b, name=f"{p.config.name}@{b}bit")
                out.append(dataclasses.replace(p, config=config))
        return out
