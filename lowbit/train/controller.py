"""`create_compressed_model`: NNCF's training-time entry point on lowbit, for the user's own training loop.

    controller, model = lowbit.create_compressed_model(model, config, dataset=lowbit.Dataset(loader, transform))
    for epoch in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y) + controller.loss()
            ...; controller.scheduler.step()
        controller.scheduler.epoch_step()
    print(controller.statistics().to_str())
    controller.export_model("model.xml")         # or plain = controller.strip()

`config` is NNCF's JSON form or NNI's quantization config_list (train/config.py). Quantization calibrates the
quantizers on `dataset` (`initializer.range`), then re-estimates BatchNorm statistics where BNs remain
(`initializer.batchnorm_adaptation`, with `fold_bn="train"`); filter pruning returns a masked module whose ratio
the scheduler moves (pruning/masks.py). `get_compression_state()` with the model's `state_dict()` resumes exactly
through `create_compressed_model(model, config, compression_state=...)`, with no data. Under torch.distributed
the calibrated ranges are averaged over the ranks, so every rank starts from the same quantizers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DatasetError
from ..quant.scope import nncf_scope
from .config import CompressionConfig, FilterPruning, Quantization, read_config

# PTQ without bias correction (training moves the biases), and without cleanup: it would drop the Dropouts the
# model trains with (the torch writer keeps them as nn.Dropout)
QAT_PASSES = ["fold_bn", "fuse", "quantize"]


class CompressionStage(enum.IntEnum):
    UNCOMPRESSED = 0
    PARTIALLY_COMPRESSED = 1
    FULLY_COMPRESSED = 2


class CompressionScheduler:
    """Counts steps and epochs; a pruning schedule moves with them (a quantized model is compressed at once)."""

    def __init__(self, masks: Any = None):
        self.masks = masks
        self.current_step, self.current_epoch = -1, -1

    def step(self, next_step: int | None = None) -> None:
        self.current_step = self.current_step + 1 if next_step is None else next_step
        if self.masks is not None:
            self.masks.step()

    def epoch_step(self, next_epoch: int | None = None) -> None:
        self.current_epoch = self.current_epoch + 1 if next_epoch is None else next_epoch
        if self.masks is not None:
            self.masks.epoch_step()

    def get_state(self) -> dict:
        return {"current_step": self.current_step, "current_epoch": self.current_epoch}

    def load_state(self, state: dict) -> None:
        self.current_step, self.current_epoch = state["current_step"], state["current_epoch"]


@dataclass(frozen=True)
class Statistics:
    """What the controller reports: one row per compressed layer, and the totals."""

    algorithm: str
    rows: tuple[tuple[str, ...], ...]
    header: tuple[str, ...]
    summary: dict

    def to_str(self) -> str:
        widths = [max(len(str(r[i])) for r in (self.header, *self.rows)) for i in range(len(self.header))]

        def line(row) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

        lines = [f"{self.algorithm}: " + ", ".join(f"{k} {v}" for k, v in self.summary.items()), line(self.header)]
        return "\n".join(lines + [line(r) for r in self.rows])

    def __str__(self) -> str:
        return self.to_str()


class CompressionController:
    """What create_compressed_model returns beside the model (NNCF's controller API)."""

    def __init__(self, model: Any, config: CompressionConfig, scheduler: CompressionScheduler):
        self.model, self.config, self.scheduler = model, config, scheduler

    @property
    def pruning(self) -> bool:
        return self.config.algorithm(FilterPruning) is not None

    @property
    def quantization(self) -> bool:
        return self.config.algorithm(Quantization) is not None

    def loss(self):
        """The compression loss to add to the task loss: zero (no regularizer is configured)."""
        import torch

        return torch.zeros((), device=next(iter(self.model.parameters())).device)

    def compression_stage(self) -> CompressionStage:
        if not self.pruning:
            return CompressionStage.FULLY_COMPRESSED
        masks = self.model.lowbit_pruning
        if masks.ratio >= masks.schedule.final:
            return CompressionStage.FULLY_COMPRESSED
        return CompressionStage.PARTIALLY_COMPRESSED if masks.ratio > 0 else CompressionStage.UNCOMPRESSED

    def statistics(self) -> Statistics:
        from ..frontends import graph_of
        from ..pruning.cost import cost

        graph = graph_of(self.model)
        model_cost = cost(graph)
        quantized = quantization_statistics(graph, model_cost) if self.quantization else None
        if not self.pruning:
            return quantized
        pruned = self._pruning_statistics(model_cost)
        if quantized is None:
            return pruned
        return Statistics("filter_pruning + quantization", quantized.rows, quantized.header,
                          {**pruned.summary, "layers quantized": quantized.summary["layers quantized"]})

    def _pruning_statistics(self, model_cost) -> Statistics:
        from ..pruning.cost import cost
        from ..pruning.masks import strip_masks

        masks = self.model.lowbit_pruning
        rows = tuple((g.names[0] if g.names else "?", str(g.size), str(int(keep.sum())))
                     for g, keep in zip(masks.groups, masks.kept))
        after = cost(strip_masks(self.model))  # the physically pruned graph
        return Statistics("filter_pruning", rows, ("group", "channels", "kept"),
                          {"ratio": round(masks.ratio, 4), "params": f"{model_cost.params} -> {after.params}",
                           "MACs": f"{model_cost.macs} -> {after.macs}",
                           "stage": self.compression_stage().name})

    def strip(self, do_copy: bool = True, format: str = "native") -> Any:
        """The deployable torch module: quantizers as torch's own fake-quantize ops (lowbit.strip), or the
        physically pruned module. The compressed model is never changed, so `do_copy` (NNCF's) has no effect."""
        from ..compiler import strip

        return strip(self.model, format=format)

    def export_model(self, path: Any, *, example_inputs: Any = None) -> Any:
        """Write the compressed model as .onnx (QDQ) or .xml (OpenVINO IR); a pruned one physically smaller."""
        from ..compiler import _writeback, export
        from ..pruning.masks import strip_masks

        model = _writeback(strip_masks(self.model), self.model) if self.pruning else self.model
        return export(model, path, example_inputs=example_inputs)

    def get_compression_state(self) -> dict:
        """What resumes this compression (with the model's state_dict): the config, lowbit's compression state
        (graph, quantizers, masks) and the scheduler's position. Pickles with torch.save."""
        from ..state import compression_state

        state, arrays = compression_state(self.model)
        return {"config": self.config.raw, "lowbit_state": state, "arrays": arrays,
                "scheduler": self.scheduler.get_state()}

    def distributed(self) -> None:
        """Prepare for training under torch.distributed: average the quantizers' ranges over the ranks (each may
        have calibrated on its own shard), so that every rank holds the same model."""
        sync_ranges(self.model)


def quantization_statistics(graph, model_cost) -> Statistics:
    """Bits of every quantized layer's weight and data input."""
    from ..ir.ops import LAYERS, VALUE_PRESERVING, is_fake_quantize

    rows = []
    for node in graph:
        if node.op_type not in LAYERS or node.domain:
            continue
        bits = []
        for port in (1, 0):
            v = node.input(port) if port < len(node.inputs) else None
            while v is not None and v.producer is not None and v.producer.op_type in VALUE_PRESERVING:
                v = v.producer.input(0)  # a quantizer moved above a Flatten still quantizes this input
            fq = v.producer if v is not None and v.producer is not None else None
            bits.append(str(int(np.ceil(np.log2(int(fq.attrs["levels"])))))
                        if fq is not None and is_fake_quantize(fq) else "fp32")
        rows.append((node.name, node.op_type, *bits))
    quantized = sum(r[2] != "fp32" for r in rows)
    return Statistics("quantization", tuple(rows), ("layer", "op", "weight bits", "input bits"),
                      {"layers quantized": f"{quantized}/{len(rows)}", "params": model_cost.params,
                       "MACs": model_cost.macs})


def sync_ranges(model: Any) -> None:
    """Average every quantizer parameter over the torch.distributed ranks (nothing outside distributed runs)."""
    import torch
    import torch.distributed as dist

    from ..backends.torch_fq import FakeQuantize

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantize):
                for p in m.parameters(recurse=False):
                    dist.all_reduce(p.data, op=dist.ReduceOp.SUM)
                    p.data /= world


def _example_inputs(config: CompressionConfig) -> Any:
    """Inputs of `input_info`'s sizes, types and fillers (random ones seeded), or None without input_info."""
    import torch

    if not config.input_info:
        return None
    g = torch.Generator().manual_seed(0)
    out = []
    for info in config.input_info:
        dtype = getattr(torch, info.dtype)
        if info.filler == "zeros" or not dtype.is_floating_point:
            out.append(torch.zeros(info.sample_size, dtype=dtype))
        elif info.filler == "ones":
            out.append(torch.ones(info.sample_size, dtype=dtype))
        else:
            out.append(torch.rand(info.sample_size, generator=g).to(dtype))
    return tuple(out)


def _hw_for(device: str, algo: Quantization):
    """The device's hardware config with each op's weight and activation quantizers narrowed to the config's
    mode, per_channel and signed (`hw_configs.narrowed`; a ConfigError names the config field none fits)."""
    from ..errors import HardwareConfigError
    from ..hw_configs import NARROWING_KEYS, load_hw_config, narrowed

    hw = load_hw_config(device)  # an unknown device is a HardwareConfigError of its own
    for kind in ("weights", "activations"):
        spec = {k: v for k, v in getattr(algo, kind).items() if k in NARROWING_KEYS}
        try:
            hw = narrowed(hw, **{kind: spec})
        except HardwareConfigError as e:
            raise ConfigError(f"config field compression.{kind}: {e}") from None
    return hw


def create_compressed_model(model: Any, config: Any, dataset: Any = None, *, compression_state: dict | None = None,
                            example_inputs: Any = None) -> tuple[CompressionController, Any]:
    """`(controller, compressed_model)` for `model` (a torch module, never changed) as `config` says (a dict or
    .json path in NNCF's form, or NNI's config_list). `dataset` (a lowbit.Dataset or an iterable of inputs)
    calibrates the quantizers; `compression_state` (from `controller.get_compression_state()`) rebuilds a
    compressed model without data, to load a checkpoint's state_dict into. The model is captured with
    `example_inputs`, or random inputs of `input_info`'s sizes, or the first dataset item."""
    from ..compiler import origin_target
    from ..errors import UnsupportedModelError

    if origin_target(model) != "torch":
        raise UnsupportedModelError(f"create_compressed_model compresses a torch module for training, not a "
                                    f"{type(model).__name__}: quantize an ONNX model with lowbit.quantize, prune it "
                                    "with lowbit.prune")
    cfg = read_config(config if compression_state is None or config is not None else compression_state["config"])
    example = example_inputs if example_inputs is not None else _example_inputs(cfg)
    if compression_state is not None:
        return _resume(model, cfg, compression_state, example)
    pruning, quantization = cfg.algorithm(FilterPruning), cfg.algorithm(Quantization)
    compressed = model
    if pruning is not None:
        from ..compiler import prune

        compressed = prune(model, pruning.pruning_target, criterion=pruning.criterion, example_inputs=example,
                           dataset=dataset if example is None else None,
                           ignored_scope=nncf_scope(pruning.ignored_scopes), mode="mask",
                           schedule={"initial": pruning.pruning_init, "steps": pruning.pruning_steps,
                                     "kind": pruning.schedule, "unit": "epochs"})
    if quantization is not None:
        compressed = _quantized(compressed, cfg, quantization, dataset, example)
    compressed.train(model.training)
    return CompressionController(compressed, cfg, CompressionScheduler(getattr(compressed, "lowbit_pruning", None))), \
        compressed


def _quantized(model: Any, cfg: CompressionConfig, algo: Quantization, dataset: Any, example: Any) -> Any:
    """`model` (the user's, or a masked one) with quantizers calibrated on `dataset`; a masked model's masks
    carry over, now zeroing the weights the quantizers read."""
    if dataset is None:
        raise DatasetError("quantization needs data to initialize its ranges (initializer.range): pass "
                           "dataset=lowbit.Dataset(loader, transform_fn), or compression_state= to resume")
    from ..compiler import compile
    from ..frontends import graph_of
    from ..pruning.masks import MaskController
    from ..quant.dataset import CalibrationData
    from .bn_adaptation import batch_norm_adaptation

    compressed = compile(model, QAT_PASSES, hw=_hw_for(cfg.target_device, algo), dataset=dataset,
                         example_inputs=example, subset_size=algo.num_init_samples,
                         ignored_scope=nncf_scope(algo.ignored_scopes), preset=algo.preset,
                         range_estimator=algo.range_type, overflow_fix=algo.overflow_fix, bits=algo.bits,
                         range_learning=algo.range_learning, fold_bn=algo.fold_bn,
                         per_tensor_weights=algo.per_tensor_weights,
                         weight_range_estimator=algo.weight_range_estimator, progress=False)
    masks = getattr(model, "lowbit_pruning", None)
    if masks is not None:
        compressed.lowbit_pruning = MaskController(compressed, graph_of(compressed), masks.spec, masks.schedule,
                                                   t=masks.t, keep=masks.kept)
    sync_ranges(compressed)
    if algo.num_bn_adaptation_samples > 0 and algo.fold_bn == "train":
        first = CalibrationData(dataset, 1).first()
        first = first[0] if isinstance(first, (tuple, list)) else first
        per_item = int(first.shape[0]) if getattr(first, "ndim", 0) else 1
        batch_norm_adaptation(compressed, dataset, max(1, -(-algo.num_bn_adaptation_samples // per_item)))
    return compressed


def _resume(model: Any, cfg: CompressionConfig, state: dict, example: Any) -> tuple[CompressionController, Any]:
    from ..errors import StateError
    from ..state import from_compression_state

    if not isinstance(state, dict) or not {"lowbit_state", "arrays", "scheduler"} <= set(state):
        raise StateError("compression_state is not what controller.get_compression_state() returned: it lacks "
                         "lowbit_state, arrays or scheduler")
    compressed = from_compression_state(model, state["lowbit_state"], state["arrays"], example_inputs=example,
                                        where="compression_state")
    scheduler = CompressionScheduler(getattr(compressed, "lowbit_pruning", None))
    scheduler.load_state(state["scheduler"])
    compressed.train(model.training)
    return CompressionController(compressed, cfg, scheduler), compressed
