"""What a pass is: a small class with a `name` that rewrites a graph, and the registry of passes by name.

    @register_pass
    class MyPass(Pass):
        name = "my_pass"
        def __call__(self, graph, ctx):
            fired = my_rules.apply(graph)
            return PassResult(graph, changed=bool(fired), fired=fired)

`requires(graph, ctx)` and `ensures(graph, ctx)` are hooks the PassManager
calls before and after the pass; raise PassError from them to stop the
pipeline with a message that names the broken precondition.

Statistics: a pass that reads calibration statistics declares them in
`statistics_needed(graph, ctx)` (a list of `lowbit.quant.summary.Need`) and
reads them with `lowbit.quant.calibration.gather`; the first pass of a
pipeline that gathers taps, in the same run over the data, what the passes
after it declare, into `ctx.statistics`. The PassManager clears that cache
after each pass whose `preserves_statistics` is False (the default): set it
True only where the pass leaves every value's FP32 function unchanged, or
updates the cache entries of the values it changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnknownPassError
from ..hw_configs import HwConfig, load_hw_config
from ..ir.graph import Graph
from ..pruning.plan import PruneSpec
from ..quant.summary import Need, StatisticsCache
from .options import Options


@dataclass
class PassContext:
    """What passes share: the device config, the calibration data, options, and what ran before."""

    hw: HwConfig = "CPU"  # a device name, a .json path or a dict is parsed (and checked) into a HwConfig
    dataset: Any = None
    subset_size: int = 300
    ignored_scope: Any = None
    options: Options = field(default_factory=Options)  # a dict of option names is converted (and checked)
    pruning: PruneSpec | None = None  # what prune_filters removes (None: its defaults)
    history: list[str] = field(default_factory=list)
    statistics: StatisticsCache = field(default_factory=StatisticsCache)  # see lowbit/quant/summary.py
    upcoming: list[Any] = field(default_factory=list)  # the passes after the running one (set by the PassManager)

    def __post_init__(self):
        self.hw = load_hw_config(self.hw)
        if isinstance(self.pruning, dict):
            self.pruning = PruneSpec(**self.pruning)
        self.options = Options.of(self.options)


@dataclass
class PassResult:
    """The graph after a pass, whether it changed, and how often each rule fired."""

    graph: Graph
    changed: bool
    fired: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


class Pass:
    """Base class of every pass. Subclasses set `name` and implement `__call__`."""

    name: str = ""
    description: str = ""
    preserves_statistics: bool = False  # True: ctx.statistics stays valid after this pass (see the module doc)
    prerequisites: tuple[str, ...] = ()  # passes that must have run on the graph before this one (any pipeline)

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Raise PassError if the graph is not fit for this pass."""

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Raise PassError if the pass did not establish what it promises."""

    def statistics_needed(self, graph: Graph, ctx: PassContext) -> list[Need]:
        """The statistics this pass will read if it ran on `graph` now (for an earlier pass to tap)."""
        return []

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Make a pass available by name in pipelines (`passes=["my_pass"]`)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name` to be registered")
    PASSES[cls.name] = cls
    return cls


def resolve(spec: Pass | str | type[Pass]) -> Pass:
    """A pass instance for a pass, a pass class or a registered name."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    if isinstance(spec, str):
        from . import builtin  # noqa: F401  (registers the built-in passes)

        if spec not in PASSES:
            import difflib

            close = difflib.get_close_matches(spec, PASSES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownPassError(f"unknown pass {spec!r}.{hint} Known passes: {', '.join(sorted(PASSES))}")
        return PASSES[spec]()
    if callable(spec):
        return FunctionPass(spec)
    raise UnknownPassError(f"a pipeline entry must be a pass name, a Pass or a function, not {type(spec).__name__}")


class FunctionPass(Pass):
    """Wraps `fn(graph, ctx) -> bool | PassResult | None` as a pass named after the function."""

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", "function")

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        out = self.fn(graph, ctx)
        if isinstance(out, PassResult):
            return out
        return PassResult(graph, changed=bool(out) if out is not None else True)
