"""compile() and quantize(): lower a model, run a pass pipeline, give back the same kind of model; export().

A torch model comes back as a torch module (an fx.GraphModule; trainable,
with FakeQuantize modules after quantization), an ONNX model (or .onnx path)
as an onnx.ModelProto (QDQ after quantization). With `dump_dir`, the
PassManager writes what every pass did there. `export` writes what these
return as ONNX QDQ (.onnx) or OpenVINO IR (.xml + .bin).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import codegen, graph_of, lower
from .errors import CaptureError, DatasetError, OptionError, OutputPathError, UnsupportedModelError
from .ir.graph import Graph
from .passes import DEFAULT_PIPELINE, PTQ_PIPELINE, TRANSFORMER_PTQ_PIPELINE, Pass, PassContext, PassManager
from .passes.options import Options

DATA_PASSES = ("smooth_quant", "quantize", "fast_bias_correction")  # the passes that read calibration data


def origin_target(model: Any) -> str:
    """The codegen target that gives back the kind of model the user passed (its frontend's)."""
    from .frontends import frontend_for

    return frontend_for(model).target


def default_pipeline(hw: Any = "CPU", dataset: Any = None, model_type: str | None = None) -> list[str]:
    """The passes `compile` runs when none are named: with calibration data, the full PTQ pipeline
    (for transformers with smooth_quant before quantize, as NNCF does)."""
    if dataset is None:
        return list(DEFAULT_PIPELINE)
    return list(TRANSFORMER_PTQ_PIPELINE if model_type == "transformer" else PTQ_PIPELINE)


def run_pipeline(graph: Graph, passes: Sequence[Pass | str] | None, ctx: PassContext,
                 dump_dir: str | Path | None = None) -> tuple[Graph, PassManager]:
    if passes is None:
        passes = default_pipeline(ctx.hw, ctx.dataset, ctx.options.model_type)
    from .ir.fingerprint import record_source

    record_source(graph)  # what lowbit.save writes, to check lowbit.load's model against
    graph.meta["pipeline_options"] = {"hw": ctx.hw.device, **dataclasses.asdict(ctx.options)}  # saved with the state
    graph.meta["hw_config"] = ctx.hw.to_dict()  # the whole device config, as the state file records it
    pm = PassManager(passes, dump_dir=dump_dir)
    return pm.run(graph, ctx), pm


def _example_from_dataset(data: Any) -> tuple:
    """Item 0 of the calibration data, which stays in `data` for the passes (a generator is read once)."""
    x = data.first()
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _varying_dims(data: Any, example: tuple) -> list[set[int]] | None:
    """Per example input, the dims (besides the batch) in which the calibration items differ: natural-length
    sentences. The torch model is captured with those dims dynamic so that every item can be fed."""
    dims: list[set[int]] = [set() for _ in example]
    for item in data.items()[1:]:
        args = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        for i, (a, b) in enumerate(zip(example, args)):
            shape_a, shape_b = getattr(a, "shape", None), getattr(b, "shape", None)
            if shape_a is not None and shape_b is not None and len(shape_a) == len(shape_b):
                dims[i].update(d for d in range(1, len(shape_a)) if shape_a[d] != shape_b[d])
    return dims if any(dims) else None


def refuse_low_precision_torch(model: Any) -> None:
    """UnsupportedModelError, before any work, for a torch module with bfloat16 weights: ONNX Runtime has no
    bfloat16 QDQ kernels to deploy it with (float16 modules quantize: statistics in float32, the simulation
    and the exported scales in float16)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.dtype == torch.bfloat16:
            raise UnsupportedModelError(
                f"{type(model).__name__} holds bfloat16 weights ({name!r}): lowbit quantizes float32 and float16 "
                "torch models. Quantize a float32 copy (copy.deepcopy(model).float(), with float32 calibration "
                "data) or a float16 one (.half())")


def _writeback(graph: Graph, model: Any) -> Any:
    target = origin_target(model)
    result = codegen(graph, target)  # a torch module holds its graph (lowbit_graph)
    if target == "torch":
        result.train(_trains(model))
    return result


def _trains(model: Any) -> bool:
    """Whether the module lowbit writes for `model` starts in training mode: the user's flag, unless every
    module whose behaviour the flag changes (Dropout, BatchNorm) is in eval mode, as in a fresh wrapper
    (training by default) around a model the user put in eval mode: that model does not drop out, nor should
    what lowbit gives back."""
    import torch

    if not getattr(model, "training", False):
        return False
    moded = [m for m in model.modules() if isinstance(m, (torch.nn.modules.dropout._DropoutNd,
                                                              torch.nn.modules.batchnorm._BatchNorm))]
    return not moded or any(m.training for m in moded)


def pass_context(*, hw: Any = "CPU", dataset: Any = None, subset_size: int = 300, ignored_scope: Any = None,
                 preset: str | None = None, model_type: str | None = None, range_estimator: str | None = None,
                 overflow_fix: str = "first_layer", progress: bool = True, pruning: Any = None, bits: Any = None,
                 range_learning: str = "range", fold_bn: str = "eval", per_tensor_weights: str = "folded",
                 weight_range_estimator: str = "auto") -> PassContext:
    """The PassContext of a compile/quantize call, every option checked (an OptionError or
    HardwareConfigError names the bad one) before any work."""
    from .hw_configs import load_hw_config
    from .quant.dataset import CalibrationData, check_subset_size
    from .quant.scope import as_ignored_scope

    hw = load_hw_config(hw)
    subset_size = check_subset_size(subset_size)
    ignored_scope = as_ignored_scope(ignored_scope)
    options = Options(preset=preset, model_type=model_type, range_estimator=range_estimator,
                      overflow_fix=overflow_fix, progress=progress, bits=bits, range_learning=range_learning,
                      fold_bn=fold_bn, per_tensor_weights=per_tensor_weights,
                      weight_range_estimator=weight_range_estimator)
    if dataset is not None:  # read once, lazily, and shared by capture and every pass that needs data
        dataset = CalibrationData(dataset, subset_size)
    return PassContext(hw=hw, dataset=dataset, subset_size=subset_size, ignored_scope=ignored_scope, options=options,
                       pruning=pruning)


def ptq_passes(dataset: Any, model_type: str | None = None, fast_bias_correction: bool = True) -> list[str]:
    """The passes of nncf.quantize-style post-training quantization."""
    pipeline = default_pipeline(dataset=dataset, model_type=model_type)
    return [p for p in pipeline if fast_bias_correction or p != "fast_bias_correction"]


def compile(model: Any, passes: Sequence[Pass | str] | None = None, *, hw: Any = "CPU", dataset: Any = None,
            example_inputs: Any = None, subset_size: int = 300, ignored_scope: Any = None,
            dump_dir: str | Path | None = None, preset: str | None = None, model_type: str | None = None,
            range_estimator: str | None = None, overflow_fix: str = "first_layer", progress: bool = True,
            pruning: Any = None, bits: Any = None, range_learning: str = "range", fold_bn: str = "eval",
            per_tensor_weights: str = "folded", weight_range_estimator: str = "auto") -> Any:
    """Lower `model`, run `passes` (default: the device's pipeline), and write it back as the kind it was.

    With `dataset` (a lowbit.Dataset) and no `passes`, this is post-training
    quantization: cleanup, fold_bn, fuse, quantize, fast_bias_correction (with
    `model_type="transformer"`, smooth_quant before quantize). `bits` sets 2 to 8 bits per weight or
    activation, per layer (lowbit/quant/bits.py); `range_learning` says how a torch module's quantizers learn
    in QAT: "range" (their range ends, as NNCF) or "lsq" (a step size, as LSQ). `fold_bn="train"` keeps each
    Conv's BatchNorm training, merged into the weight the quantizer sees, and folds it at export or strip
    (passes/fold_bn.py); "eval" (the default) folds it first. `per_tensor_weights` says what the one grid of a
    per-tensor weight quantizer spans where a BN is folded into its layer: "folded" (the default), the deployed
    weight W * s, for hardware with one scale per weight tensor; "unfolded", the stored W, as NNCF's
    per-tensor weights on a torch model: deployed, each filter's grid is then scaled by its BN's s.
    `weight_range_estimator` sets the weights' ranges: "min_max" (their ends, as NNCF), "mse" (clipped for the
    least squared rounding error, quant/weight_mse.py) or "auto" (the default: "mse" for a per-tensor grid
    below 8 bits, where one min/max grid for a whole tensor is too coarse, else "min_max").
    """
    ctx = pass_context(hw=hw, dataset=dataset, subset_size=subset_size, ignored_scope=ignored_scope, preset=preset,
                       model_type=model_type, range_estimator=range_estimator, overflow_fix=overflow_fix,
                       progress=progress, pruning=pruning, bits=bits, range_learning=range_learning,
                       fold_bn=fold_bn, per_tensor_weights=per_tensor_weights,
                       weight_range_estimator=weight_range_estimator)
    from .passes import resolve

    if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
        raise OptionError(f"dump_dir is a {type(dump_dir).__name__}: pass a folder path (str or Path) or None")
    if passes is not None:
        if isinstance(passes, (str, bytes)) or not hasattr(passes, "__iter__"):
            raise OptionError(f"passes is a {type(passes).__name__}: pass a list of pass names or Pass objects, "
                              "e.g. passes=['cleanup', 'fold_bn', 'fuse'] (`lowbit passes` lists them)")
        passes = [resolve(p) for p in passes]  # an unknown pass name fails before the model is captured
    torch_origin = origin_target(model) == "torch"
    if dataset is None and example_inputs is None and torch_origin and passes is not None:
        needs = [p.name for p in passes if p.name in DATA_PASSES]
        if needs:
            raise DatasetError(f"pass {needs[0]!r} needs calibration data: pass dataset=lowbit.Dataset(...) "
                               "(the torch model is then captured with its first item)")
    if torch_origin and (passes is None and dataset is not None
                         or passes is not None and any(p.name == "quantize" for p in passes)):
        refuse_low_precision_torch(model)
    from_dataset = example_inputs is None and dataset is not None and torch_origin
    dynamic_dims = None
    if from_dataset:
        example_inputs = _example_from_dataset(ctx.dataset)
        dynamic_dims = _varying_dims(ctx.dataset, example_inputs)
    try:
        graph = lower(model, example_inputs, dynamic_dims=dynamic_dims)
    except CaptureError as e:
        if not from_dataset or getattr(e, "blames_inputs", True) is False:
            raise  # the model's fault (data-dependent control flow): no dataset item can fix it
        got = ", ".join(f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
                        for x in example_inputs)
        raise DatasetError(f"dataset item 0 ({got}) cannot be fed to {type(model).__name__}: "
                           f"{str(e).rstrip('.')}. Fix transform_fn so it returns what forward() takes") from e
    graph, _ = run_pipeline(graph, passes, ctx, dump_dir)
    return _writeback(graph, model)


def quantize(model: Any, calibration_dataset: Any, *, preset: str | None = None, target_device: str = "ANY",
             subset_size: int = 300, fast_bias_correction: bool = True, model_type: str | None = None,
             ignored_scope: Any = None, example_inputs: Any = None, dump_dir: str | Path | None = None,
             overflow_fix: str = "first_layer", bits: Any = None, range_learning: str = "range",
             per_tensor_weights: str = "folded", weight_range_estimator: str = "auto") -> Any:
    """Post-training INT8 quantization, a drop-in for `nncf.quantize`.

    A torch nn.Module comes back as a torch module with FakeQuantize modules
    (its example inputs are the first dataset item unless given); an ONNX
    model as an onnx.ModelProto in QDQ form. `overflow_fix` ("first_layer", as
    NNCF; "enable" for models deployed on x86 CPUs without VNNI; "disable")
    says which weights use a 7-bit grid (see passes/quantize.py). `bits`, `range_learning` and
    `per_tensor_weights` and `weight_range_estimator` are compile's (per-layer bit widths; how the quantizers
    learn in QAT; what a per-tensor weight grid spans where a BatchNorm is folded; how weight ranges are set).
    """
    if calibration_dataset is None:
        raise DatasetError("lowbit.quantize needs a calibration dataset: pass lowbit.Dataset(items, transform_fn) "
                           "with a few hundred representative inputs (NNCF uses 300); example_inputs alone cannot "
                           "calibrate the quantizers")
    return compile(model, ptq_passes(calibration_dataset, model_type, fast_bias_correction), hw=target_device,
                   dataset=calibration_dataset, example_inputs=example_inputs, subset_size=subset_size,
                   ignored_scope=ignored_scope, dump_dir=dump_dir, preset=preset, model_type=model_type,
                   overflow_fix=overflow_fix, bits=bits, range_learning=range_learning,
                   per_tensor_weights=per_tensor_weights, weight_range_estimator=weight_range_estimator)


def prune(model: Any, ratio: float = 0.5, *, criterion: str = "l2", dataset: Any = None,
          config_list: Sequence[dict] | None = None, ignored_scope: Any = None, example_inputs: Any = None,
          round_to: int = 1, mode: str = "shrink", schedule: dict | None = None) -> Any:
    """Filter pruning: remove `ratio` of the channels of every channel dependency group.

    mode="shrink" returns the kind of model it was given, physically smaller:
    a torch module (trainable, parameters under the user's names) or an
    onnx.ModelProto. mode="mask" (torch models) returns a trainable module in
    which the pruned filters are zero and stay zero through training; its
    `lowbit_pruning` controller moves the ratio on `schedule` ({"initial": 0.0,
    "steps": 10, "kind": "agp" | "linear", "unit": "epochs" | "steps"}; the
    final ratio is `ratio`) with `step()` / `epoch_step()`, and
    `lowbit.strip(masked)` gives the physically pruned module.

    `criterion` is one of lowbit.pruning.CRITERIA; `config_list` takes NNI's
    form (a list of {"sparsity" or "ratio", "op_types", "op_names",
    "exclude"}, later entries overriding earlier ones); `round_to` keeps
    channel counts multiples of N; layers in `ignored_scope` keep their
    filters. A torch model is captured with `example_inputs` (or the first
    `dataset` item). What was pruned, and why a group was left alone, is
    `graph.meta["pruning"]` of the result (`lowbit.api.graph_of(pruned)` for
    a torch module).
    """
    from .errors import PruneError
    from .pruning import PruneSpec

    if mode not in ("shrink", "mask"):
        raise PruneError(f"mode={mode!r}: use 'shrink' (a physically smaller model) or 'mask' (zeroed filters "
                         "while fine-tuning, then lowbit.strip)")
    if config_list is not None and (isinstance(config_list, (str, dict)) or not hasattr(config_list, "__iter__")):
        raise PruneError(f"config_list is a {type(config_list).__name__}: pass a list of dicts such as "
                         "[{'sparsity': 0.5, 'op_types': ['Conv2d']}]")
    spec = PruneSpec(ratio=ratio, criterion=criterion, round_to=round_to, config_list=tuple(config_list or ()))
    if mode == "shrink":
        if schedule is not None:
            raise PruneError("a schedule moves masks while fine-tuning: pass mode='mask' with it")
        # a torch model keeps its Dropouts (cleanup drops them), so that the pruned module fine-tunes as the user's
        passes = ["prune_filters"] if origin_target(model) == "torch" else ["cleanup", "prune_filters"]
        return compile(model, passes, dataset=dataset, example_inputs=example_inputs, ignored_scope=ignored_scope,
                       pruning=spec, progress=False)
    return _masked(model, spec, schedule, dataset, example_inputs, ignored_scope)


def _masked(model: Any, spec: Any, schedule: dict | None, dataset: Any, example_inputs: Any, ignored_scope: Any):
    from .errors import PruneError
    from .pruning.masks import MaskController, Schedule
    from .quant.scope import as_ignored_scope

    if origin_target(model) != "torch":
        raise PruneError("mode='mask' needs a torch model (masks live in training); prune an ONNX model with "
                         "mode='shrink'")
    if spec.config_list:
        raise PruneError("mode='mask' takes one ratio for every group; config_list is for mode='shrink'")
    if spec.criterion == "taylor":
        raise PruneError("mode='mask' scores the channels again at every schedule step from the weights alone; "
                         "Taylor importance needs gradients: use criterion 'l2' (or prune with mode='shrink')")
    if schedule is not None and not isinstance(schedule, dict):
        raise PruneError(f"schedule is a {type(schedule).__name__}: pass a dict such as "
                         "{'initial': 0.0, 'steps': 10, 'kind': 'agp', 'unit': 'epochs'}")
    unknown = set(schedule or {}) - {"initial", "steps", "kind", "unit"}
    if unknown:
        raise PruneError(f"unknown schedule keys {sorted(unknown)}: use initial, steps, kind and unit (the final "
                         "ratio is `ratio`)")
    plan_of = Schedule(**{"initial": spec.ratio, **(schedule or {}), "final": spec.ratio})
    module = compile(model, [], dataset=dataset, example_inputs=example_inputs, progress=False)
    graph = graph_of(module)
    scope = as_ignored_scope(ignored_scope)
    keep = frozenset(scope.resolve(graph)) if scope is not None else frozenset()
    module.lowbit_pruning = MaskController(module, graph, dataclasses.replace(spec, keep=keep), plan_of)
    return module


def strip(model: Any, format: str = "native") -> Any:
    """What a compressed torch module becomes for deployment.

    - A masked module (lowbit.prune(..., mode="mask")): the masked channels are removed physically.
    - A quantized module (compile/quantize, after QAT too): a plain torch module that holds no lowbit class,
      each quantizer written as torch's own op on the grid the QDQ export uses: format="native"
      (torch.fake_quantize_per_tensor/per_channel_affine) or "dequantize" (constant weights stored as integers,
      dequantized on use). It exports with torch.onnx.export and openvino.convert_model.

    A pruned, unquantized module comes back as a lowbit module (it can still be quantized); a module lowbit did
    not make comes back unchanged, with a warning.
    """
    from .backends.torch_emit import FAKE_QUANTIZE_FORMS, to_torch
    from .errors import PruneError
    from .ir.ops import is_fake_quantize
    from .pruning.masks import strip_masks

    if format not in FAKE_QUANTIZE_FORMS[1:]:
        raise OptionError(f"format={format!r}: strip writes quantizers as 'native' (torch.fake_quantize_*) or "
                          "'dequantize' (integer weights)")
    masked = getattr(model, "lowbit_pruning", None) is not None
    graph = strip_masks(model) if masked else graph_of(model)
    if graph is None:  # not a lowbit module: nothing to strip
        import warnings

        warnings.warn(f"lowbit.strip: this {type(model).__name__} holds nothing lowbit made; it is returned "
                      "unchanged", stacklevel=2)
        return model
    if masked:
        graph.meta["passes_run"] = [*graph.meta.get("passes_run", []), "prune_filters"]
    if not any(is_fake_quantize(n) for n in graph):
        if not masked:
            raise PruneError(f"this {type(model).__name__} has neither pruning masks nor quantizers: strip takes "
                             "what lowbit.prune(model, ratio, mode='mask') or lowbit.quantize returned")
        return _writeback(graph, model)
    return to_torch(graph, fake_quantize=format).train(bool(getattr(model, "training", False)))


def export(model: Any, path: str | os.PathLike, *, example_inputs: Any = None, runtime: str | None = None) -> Path:
    """Write a model as ONNX (.onnx) or OpenVINO IR (.xml and .bin beside it).

    `model` is what compile/quantize returned (quantizers are written as QDQ in
    ONNX and as FakeQuantize in OpenVINO IR), or an FP32 model of any kind
    `lower` takes: an nn.Module with `example_inputs` (its batch dim stays
    dynamic), an ExportedProgram, an onnx.ModelProto or an .onnx path. Nothing
    is run through a pass: a QDQ model keeps its quantization as it is.

    `runtime` says which runtime an .onnx is for: "onnxruntime" (the default)
    or "openvino" (OpenVINO reading the .onnx). The grids are the same; the
    storage type of signed activation grids differs, because each runtime
    runs a different form as INT8 (see lowbit/backends/qdq.py). An .xml is for
    OpenVINO. A QDQ model from `quantize` can be written again for the other.
    """
    from . import backends
    from .backends.qdq import RUNTIMES

    if not isinstance(path, (str, os.PathLike)):
        raise OutputPathError(f"the export path is a {type(path).__name__}: pass a str or Path ending in "
                              f"{' or '.join(backends.suffixes())}")
    path = Path(path)
    if runtime is not None and runtime not in RUNTIMES:
        raise OptionError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)} (the runtime the "
                          ".onnx will run in)")
    backends.check_options(backends.backend_for_path(path), path, {"runtime": runtime})
    graph = lower(model, example_inputs)
    writable_parent(path)
    return backends.save(graph, path, runtime=runtime)


def writable_parent(path: Path) -> None:
    """Create `path`'s folder, or raise OutputPathError naming why it cannot be written there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot write {str(path)!r}: its folder cannot be created ({e.strerror or e})") \
            from None
    if path.is_dir():
        raise OutputPathError(f"cannot write {str(path)!r}: it is a folder; give a file path")
    if not os.access(path.parent, os.W_OK):
        raise OutputPathError(f"cannot write {str(path)!r}: its folder {str(path.parent)!r} is not writable")
