"""Masks during fine-tuning (the NNI and old-NNCF workflow): pruned filters are zero and stay zero through
training, the ratio grows on a schedule, and `strip` then removes them physically.

`MaskController` holds, for one torch module lowbit generated, the channel
groups of its graph, the channels each group keeps, and where every member
of a group lives in the module (a parameter or buffer, the axis, the
positions of each channel). Before every forward it multiplies those tensors
by their masks, in place: whatever the optimizer does (momentum, weight
decay), a pruned channel computes nothing. Masking every member (filters,
biases, BatchNorm scale and shift, the next layers' input channels) makes the
masked module compute exactly what the physically pruned one will. A
LayerNorm over the channels is the exception a zeroed weight cannot make: its
mean and variance would still count the masked channels (zeros), and the
pruned module's do not (a ConvNeXt's or Swin's stripped module came out 10 dB
from its masked one). So while one of its channels is masked, its call in the
module computes them over the kept channels only (`masked_layer_norm`).

The ratio follows a schedule over `steps` calls of `step()` (or
`epoch_step()`, for a schedule counted in epochs): "agp" (automated gradual
pruning, Zhu & Gupta: fast at first, slower near the end) or "linear", from
`initial` to `final`. Each time the ratio changes, the channels are scored
again on the current weights; a masked channel is all zero, so it scores
lowest and stays masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PruneError
from ..frontends import graph_of
from ..ir.ops import is_fake_quantize
from .criteria import scores
from .groups import channel_groups
from .plan import kept_in_group, lowest
from .shrink import _positions

SCHEDULES = ("agp", "linear")


@dataclass(frozen=True)
class Schedule:
    """The ratio after `t` of `steps` calls: from `initial` to `final` ("agp" or "linear")."""

    initial: float = 0.0
    final: float = 0.5
    steps: int = 1
    kind: str = "agp"
    unit: str = "steps"  # "steps" (controller.step()) or "epochs" (controller.epoch_step())

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise PruneError(f"unknown schedule {self.kind!r}: use one of {', '.join(SCHEDULES)}")
        if self.unit not in ("steps", "epochs"):
            raise PruneError(f"schedule unit {self.unit!r}: use 'steps' or 'epochs'")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise PruneError(f"schedule steps={self.steps!r} must be a positive int")
        for name in ("initial", "final"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise PruneError(f"schedule {name}={value!r} is not in [0, 1)")
        if self.initial > self.final:
            raise PruneError(f"schedule initial={self.initial} is above final={self.final}: ratios only grow")

    def ratio(self, t: int) -> float:
        done = min(max(t, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * done
        return self.final + (self.initial - self.final) * (1 - done) ** 3


class MaskController:
    """Masks of a lowbit-generated torch module: `step()` / `epoch_step()` move the schedule, `ratio` is the
    current one, `masks` the kept channels of each layer's filters (by its name: the filters of layers whose
    outputs a residual Add joins share one mask), `strip()` the physically
    pruned module."""

    def __init__(self, module, graph, spec, schedule: Schedule, t: int = 0, keep: list | None = None):
        self.module, self.spec, self.schedule = module, spec, schedule
        self.t = t
        self.cg = channel_groups(graph, keep=set(spec.keep))
        self.groups = [g for g in self.cg.groups() if g.blocked is None]
        names = getattr(module, "lowbit_names", {})
        self._targets = []  # per group: [(tensor path, axis, segments)]
        for g in self.groups:
            targets = []
            for m in g.members:
                path = names.get(m.value.name)
                if path is None and is_fake_quantize(m.node) and m.port > 0:
                    continue  # a weight quantizer's range: the zeroed weight is on any grid; strip cuts it
                if path is None:
                    raise PruneError(f"the constant {m.value.name!r} of {m.node.name!r} is not a tensor of the "
                                     "module: masks need every member as a parameter or buffer")
                axis = 1 - m.axis if m.value.meta.get("torch_transposed") and np.ndim(m.value.const) == 2 else m.axis
                targets.append((path, axis, m.segments, m.conv_groups))  # a Linear's: the IR holds it transposed
            self._targets.append(targets)
        # the paths of the scales of the LayerNorms over a group's channels: see masked_layer_norm
        self._norms = {names[m.value.name] for g in self.groups for m in g.members
                       if m.node.op_type == "LayerNormalization" and m.port == 1 and m.value.name in names}
        self.masks: dict[str, np.ndarray] = {}
        self._keep: list[np.ndarray] = [np.ones(g.size, bool) for g in self.groups]
        self._zeroed: list[tuple[str, tuple]] = []  # (tensor path, index of the entries), made by _masked()
        self._handle = module.register_forward_pre_hook(lambda mod, args: self.apply())
        if keep is None:
            self._set_ratio(schedule.ratio(t))
        else:  # restored from a state file
            if [len(k) for k in keep] != [g.size for g in self.groups]:
                raise PruneError("the saved masks do not fit this model's channel groups")
            self._keep = [np.asarray(k, bool) for k in keep]
            for g, k in zip(self.groups, self._keep):
                self.masks.update(dict.fromkeys(g.names, k))
            self._masked()

    def state(self) -> dict:
        """What the compression-state file records: the spec, the schedule and its position, every group's mask."""
        return {"ratio": self.spec.ratio, "criterion": self.spec.criterion, "round_to": self.spec.round_to,
                "keep_layers": sorted(self.spec.keep), "t": self.t,
                "schedule": {"initial": self.schedule.initial, "final": self.schedule.final,
                             "steps": self.schedule.steps, "kind": self.schedule.kind, "unit": self.schedule.unit},
                "masks": [k.astype(int).tolist() for k in self._keep]}

    @classmethod
    def restore(cls, module, graph, state: dict) -> MaskController:
        """The controller `state()` described, on a module rebuilt from the same state."""
        from .plan import PruneSpec

        spec = PruneSpec(state["ratio"], state["criterion"], state["round_to"], keep=frozenset(state["keep_layers"]))
        return cls(module, graph, spec, Schedule(**state["schedule"]), t=state["t"], keep=state["masks"])

    @property
    def kept(self) -> list[np.ndarray]:
        """Per group (as `groups`), which channels stay (a copy)."""
        return [k.copy() for k in self._keep]

    @property
    def ratio(self) -> float:
        return self.schedule.ratio(self.t)

    def step(self) -> None:
        """One training step done (a schedule counted in steps moves)."""
        if self.schedule.unit == "steps":
            self._advance()

    def epoch_step(self) -> None:
        """One epoch done (a schedule counted in epochs moves)."""
        if self.schedule.unit == "epochs":
            self._advance()

    def _advance(self) -> None:
        self.t += 1
        self._set_ratio(self.ratio)

    def _set_ratio(self, ratio: float) -> None:
        graph = graph_of(self.module)
        by_name = {v.name: v for v in graph.constants.values()}
        for i, g in enumerate(self.groups):
            for m in g.members:  # score the current weights, as the module holds them
                m.value.const = by_name[m.value.name].const
            keep, _ = kept_in_group(g, ratio, self.spec.round_to)
            mask = np.ones(g.size, bool)
            mask[lowest(g, scores(g, self.spec.criterion, self.cg.find), keep)] = False
            self._keep[i] = mask & self._keep[i]  # a channel once masked stays masked
            self.masks.update(dict.fromkeys(g.names, self._keep[i]))
        self._masked()

    def _masked(self) -> None:
        """The entries every masked channel occupies in each member tensor, worked out once per mask change (not
        at every forward), then zeroed."""
        removed = {g.id: np.flatnonzero(~keep) for g, keep in zip(self.groups, self._keep)}
        state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        self._zeroed = [(path, _entries(state[path].shape, axis, positions, blocks))
                        for targets in self._targets for path, axis, segments, blocks in targets
                        if (positions := _positions(segments, removed, self.cg.find)).size]
        self._mask_norms(state)
        self.apply()

    def _mask_norms(self, state: dict) -> None:
        """Point each LayerNorm call of the module whose scale has masked channels at masked_layer_norm, with a
        buffer of its kept channels (1) and masked ones (0); the others at torch's own layer_norm. `state`: the
        module's parameters and buffers by path."""
        import torch

        if not self._norms:
            return
        masked = {path: entries for path, entries in self._zeroed if path in self._norms}
        gm, changed = self.module, False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in (torch.ops.aten.layer_norm.default,
                                                                 masked_layer_norm):
                continue
            weight = node.args[2]
            path = weight.target if getattr(weight, "op", None) == "get_attr" else None
            if path not in self._norms:
                continue
            args = node.args[:5]
            if path in masked:
                buffer = "lowbit_norm_keep_" + path.replace(".", "_")
                if not hasattr(gm, buffer):
                    scale = state[path]
                    gm.register_buffer(buffer, torch.ones(scale.shape[0], device=scale.device), persistent=False)
                keep = getattr(gm, buffer)
                keep.fill_(1)
                keep[masked[path]] = 0
                if node.target is not masked_layer_norm:
                    with gm.graph.inserting_before(node):
                        args = (*args, gm.graph.get_attr(buffer))
                    node.target, node.args, changed = masked_layer_norm, args, True
            elif node.target is masked_layer_norm:
                node.target, node.args, changed = torch.ops.aten.layer_norm.default, args, True
        if changed:
            gm.graph.eliminate_dead_code()
            gm.recompile()

    def apply(self) -> None:
        """Zero every masked channel's entries, in place (called before each forward)."""
        import torch

        state = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        with torch.no_grad():
            for path, entries in self._zeroed:
                tensor = state[path]  # looked up each time: .to(device) replaces buffers
                tensor[tuple(torch.as_tensor(e, device=tensor.device) if isinstance(e, np.ndarray) else e
                             for e in entries)] = 0


def masked_layer_norm(x, shape, weight, bias, eps, keep):
    """torch's layer_norm of `x` over its last len(shape) dims, with the mean and variance taken over the entries
    where `keep` is 1 only: what the layer computes once the entries where it is 0 are removed (their outputs are
    0, the masked weight and bias being 0 there)."""
    dims = tuple(range(-len(shape), 0))
    count = keep.sum()
    mean = (x * keep).sum(dims, keepdim=True) / count
    centered = (x - mean) * keep
    variance = (centered * centered).sum(dims, keepdim=True) / count
    out = centered / (variance + eps).sqrt() * weight
    return out if bias is None else out + bias


def _entries(shape, axis: int, positions: np.ndarray, blocks: int) -> tuple:
    """The index of a masked channel's entries in a member tensor: `positions` along `axis`, or, for axis 1 of a
    grouped weight (`blocks` > 1: a grouped Conv's input channels, a grouped ConvTranspose's filters; channel
    g * a + i is column i of row block g), a [rows, a] mask."""
    if blocks == 1:
        return (slice(None),) * (axis % len(shape)) + (positions,)
    rows, a = shape[0], shape[1]
    mask = np.zeros((blocks, a), bool)
    mask[positions // a, positions % a] = True
    return (np.repeat(mask, rows // blocks, axis=0),)


def strip_masks(module):
    """The physically pruned graph of a masked module: its current (trained) weights, every masked channel
    removed."""
    from .shrink import shrink

    controller = module.lowbit_pruning
    graph = graph_of(module)
    cg = channel_groups(graph, keep=set(controller.spec.keep))
    groups = [g for g in cg.groups() if g.blocked is None]
    if [g.size for g in groups] != [g.size for g in controller.groups]:
        raise PruneError("the module's graph no longer has the channel groups its masks were made for")
    removed = {g.id: np.flatnonzero(~keep) for g, keep in zip(groups, controller._keep) if (~keep).any()}
    if removed:
        shrink(graph, cg, removed)
        graph.verify()
    return graph
