"""The fused patterns: op chains a quantizer must never split, because backends run them as one kernel.

A fused pattern is a name and a pattern rooted at the last op of the chain;
the library is a plain list, `FUSED_PATTERNS`, ordered from largest to
smallest, so a device config or a user can add one with
`register_fused_pattern(name, pattern)`. The `fuse` pass marks every node of
a match with `meta["fused"] = "<pattern>:<root node>"`.

Built in: a Conv/Gemm/MatMul, then optionally a bias Add, optionally a
BatchNormalization, then optionally an activation (Relu, Clip/Relu6,
Sigmoid, Tanh, Swish or `x * sigmoid(x)`, HardSwish, HardSigmoid, Gelu);
and a scale-shift `Mul` + `Add` by constants.
"""

from __future__ import annotations

from ...ir.ops import FUSABLE_ACTIVATIONS, LAYERS
from ..pattern import Any, Const, OneOf, Opt, P, Pattern


def linear_chain() -> Pattern:
    """linear -> bias Add? -> BatchNormalization?"""
    linear = P(LAYERS, name="linear")
    with_bias = Opt(P("Add", linear, Const("bias"), name="bias_add"))
    return Opt(P("BatchNormalization", with_bias, name="bn"))


def with_activation(inner: Pattern) -> Pattern:
    swish = P("Mul", inner, P("Sigmoid", inner, name="gate"), name="act")  # x * sigmoid(x)
    return OneOf(P(FUSABLE_ACTIVATIONS, inner, name="act"), swish)


def _root(p: Pattern) -> list[P]:
    """The P alternatives a pattern can be rooted at (rules dispatch on a P root)."""
    if isinstance(p, P):
        return [p]
    if isinstance(p, OneOf):
        return [r for o in p.options for r in _root(o)]
    if isinstance(p, Opt):
        return [p.pattern, *_root(p.pattern.inputs[0])]
    return []


FUSED_PATTERNS: list[tuple[str, Pattern]] = [
    ("linear_bn_act", with_activation(linear_chain())),
    ("linear_bias_bn", linear_chain()),
    ("scale_shift", P("Add", P("Mul", Any("x"), Const("scale"), name="mul"), Const("shift"), name="add")),
]


def register_fused_pattern(name: str, pattern: Pattern, *, first: bool = True) -> None:
    """Add a fused pattern; by default it is tried before the built-in ones."""
    if any(n == name for n, _ in FUSED_PATTERNS):
        raise ValueError(f"a fused pattern named {name!r} exists already")
    entry = (name, pattern)
    FUSED_PATTERNS.insert(0, entry) if first else FUSED_PATTERNS.append(entry)


def rooted(pattern: Pattern) -> list[P]:
    return _root(pattern)
