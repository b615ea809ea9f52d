"""Deployable INT8, lowbit side by side with NNCF: INT8 execution, accuracy, agreement and latency of the
deployed files in OpenVINO and ONNX Runtime, from both origins, in one run.

Models: ResNet18, MobileNetV2 and the ViT as bench/ptq.py trains them
(3-channel 32x32 digits; the ViT 1-channel 8x8), and a DenseNet-style CNN
(tests/models.py DenseNet: torchvision's topology, small) trained like
ResNet18 (32x32x3, 15 epochs, cosine lr, examples/digits.py `trained`;
weights cached under ~/.cache/lowbit).

Origins and deployment forms. Both tools run with their defaults (target
device ANY, fast bias correction; the ViT with model_type "transformer").
- torch origin: the nn.Module goes to `lowbit.quantize` / `nncf.quantize`.
  lowbit writes `.xml` and `.onnx` with `lowbit.export`. NNCF: `.xml` by
  `openvino.convert_model(q, example_input=x)` + `openvino.save_model` (its
  documented deployment path); `.onnx` by `nncf.strip(q, example_input=x)`
  (StripFormat.NATIVE: NNCF's quantizers become torch FakeQuantize modules)
  and `torch.onnx.export(..., dynamo=False)`, which writes them as
  QuantizeLinear/DequantizeLinear (the dynamo exporter needs onnxscript, which
  the bench extra does not install).
- ONNX origin: the FP32 ONNX model goes to both tools; the QDQ ModelProto
  each returns is the `.onnx` (`onnx.save`), and `lowbit.export(q, "m.xml")`
  / `openvino.convert_model` of it the `.xml`. The FP32 ONNX model is
  `torch.onnx.export` of the module (eval mode, which folds BatchNorm into
  Conv, as a user's FP32 ONNX model has it), not `lowbit.codegen`'s, which
  keeps BatchNormalization: NNCF's ONNX backend leaves it between the Conv
  and its output quantizer, and ONNX Runtime then ran all of NNCF's
  convolutions in FP32 (lowbit folds it).
- `.xml` runs in OpenVINO; `.onnx` runs in ONNX Runtime and in OpenVINO (which
  reads .onnx directly). lowbit writes an .onnx for the runtime it is meant
  for: the ONNX Runtime rows run `lowbit.export(q, "m.onnx")` (or the QDQ
  model `quantize` returns), the OpenVINO rows `lowbit.export(q, "m.onnx",
  runtime="openvino")` (the same grids; signed ones int8, never uint8 with
  zero point 128: see lowbit/backends/qdq.py). NNCF writes one .onnx for both.
- FP32 baselines: `openvino.convert_model` of the module (.xml) and the FP32
  ONNX model above (.onnx); one per form, shared by both origins.
- All exports keep the batch dimension dynamic.

1. INT8 execution (structural, read from what the runtime will run):
   OpenVINO: the Convolution/GroupConvolution/MatMul/FullyConnected layers of
   `compiled.get_runtime_model()` (default config), and the fused kernels
   ("Subgraph": OpenVINO fuses attention's MatMul-Softmax-MatMul into one)
   made of the model's Convolution/MatMul ops, whose rt_info
   runtimePrecision is u8/i8, of all of them; ONNX Runtime: the integer
   kernels (QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat,
   ConvInteger, MatMulInteger, DynamicQuantizeMatMul, QAttention) in the graph
   it writes to `SessionOptions.optimized_model_filepath` at
   ORT_ENABLE_EXTENDED, of those plus the float Conv/MatMul/Gemm (and their
   Fused* forms) left. The check asks for INT8 in every layer the runtime
   runs, or, where fewer, in as many layers as the tool quantized
   (Conv/Gemm/MatMul whose inputs come from DequantizeLinear in its QDQ
   file); the layers a runtime keeps in float are named under the table.
   OpenVINO's float is its default inference precision, bf16 on CPUs with
   avx512_bf16 or AMX (the header says which).
2. Accuracy and agreement, at the models' own resolution (not 224): top-1 on
   the 450 held-out digits of FP32 and INT8 in the row's runtime (OpenVINO
   with INFERENCE_PRECISION_HINT f32); agreement (top-1 agreement %, output
   SQNR dB) of each tool's deployed model with its own reference: the
   tool's torch model (torch origin) or its QDQ model in ONNX Runtime (ONNX
   origin; for the ONNX Runtime row that is the reference itself). The
   targets (>= 99.5%, >= 35 dB) apply to lowbit; NNCF's figures are context.
   Calibration: the first 300 training images, one per item (ptq.py's).
   In OpenVINO the SQNR is also measured with its residual fusion blocked:
   its CPU plugin fuses Conv -> FakeQuantize -> Add -> FakeQuantize into one
   Convolution and drops the first FakeQuantize's rounding there (an
   optimization its nodes/conv.cpp calls unsafe), which the simulation and
   ONNX Runtime keep; making each FakeQuantize that feeds an Add a model
   output too stops the fusion (`ov_logits_rounding_kept`), so the two
   figures say how much of a disagreement is that fusion.
3. Latency: batch 1; the CNNs at 224x224 (captured/exported at 224,
   calibrated on 64 training images upsampled to 224, as ptq.py's latency
   part), the ViT at its 8x8 (64 images). Measured by bench/ov_latency.py in
   fresh processes, one runtime per process (OpenVINO default config; ONNX
   Runtime default SessionOptions, CPUExecutionProvider): palindrome load
   order, interleaved rotating rounds of 5 inferences, each process starting
   the rotation at another model; samples pooled, median per model; the
   quartiles of the per-round lowbit/NNCF and FP32/INT8 ratios say how much
   of a difference is noise. "same exec graph" says whether lowbit's and
   NNCF's models compile to the same OpenVINO execution graph (layer types,
   kernels, precisions, fusions) or the same ONNX Runtime optimized graph.
4. Checks: PASS/FAIL for each target: every quantized layer runs as INT8
   (lowbit), agreement >= 99.5% and >= 35 dB (lowbit), lowbit/NNCF latency <=
   1.00 (strict: the round IQR is given to judge noise), ResNet18 INT8 faster
   than FP32 in both runtimes.

The header names the CPU, its INT8-relevant ISA flags and the versions of
OpenVINO, ONNX Runtime, NNCF and torch. Tables are printed and written to
bench/results/deploy.md (not with --quick).

    python bench/deploy.py [--models resnet18 mobilenet_v2 densenet vit] [--quick] [--no-nncf]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ptq  # noqa: E402  (puts examples/ and tests/ on sys.path)
import lowbit  # noqa: E402
from deploy_checks import ORT_FLOAT_LAYERS, ORT_INTEGER_OPS, OV_LAYERS, ort_optimized, quantized_layers  # noqa: E402
from digits import load_digits_split  # noqa: E402
from models import DenseNet  # noqa: E402

RESULTS = HERE / "results" / "deploy.md"
N_CALIB, N_CALIB_LATENCY = ptq.N_CALIB, ptq.N_CALIB_224
AGREE_MIN, SQNR_MIN = ptq.AGREE_MIN, ptq.AGREE_SQNR_MIN
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")

MODELS = {**{k: v for k, v in ptq.MODELS.items() if k != "vit"},
          "densenet": dict(factory=lambda: DenseNet(num_classes=10, in_ch=3), epochs=15, size=32, channels=3,
                           model_type=None, latency=True, schedule="cosine"),
          "vit": ptq.MODELS["vit"]}

# (origin, form, runtime) of every deployment row, in table order
DEPLOYMENTS = [("torch", "xml", "OpenVINO"), ("torch", "onnx", "ONNX Runtime"), ("torch", "onnx", "OpenVINO"),
               ("onnx", "onnx", "ONNX Runtime"), ("onnx", "onnx", "OpenVINO"), ("onnx", "xml", "OpenVINO")]
PREFIX = {"OpenVINO": "ov", "ONNX Runtime": "ort"}


# -- the machine --------------------------------------------------------------------------------------------


def machine_line() -> str:
    """CPU model, cores, INT8-relevant ISA flags and the versions of the runtimes and tools."""
    import onnxruntime
    import openvino

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = [line.split(":", 1) for line in text.splitlines() if ":" in line]
    name = next((v.strip() for k, v in fields if k.strip() == "model name"), "unknown CPU")
    flags = set(next((v.split() for k, v in fields if k.strip() == "flags"), []))
    isa = " ".join(f"{f}{'+' if f in flags else '-'}" for f in ISA_FLAGS)
    hint = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    versions = [f"OpenVINO {openvino.__version__.split('-')[0]} (default CPU inference precision {hint}: "
                "what the FP32 models and the float parts of INT8 models run in)",
                f"ONNX Runtime {onnxruntime.__version__}"]
    try:
        import nncf

        versions.append(f"NNCF {nncf.__version__}")
    except ImportError:
        versions.append("NNCF not installed")
    versions.append(f"torch {torch.__version__}")
    return f"{name}, {os.cpu_count()} cores; INT8 ISA (+ has, - lacks): {isa}; " + ", ".join(versions)


# -- models and their deployed forms ------------------------------------------------------------------------


def load(name: str):
    """(model, x_train, x_test, y_test) as bench/ptq.py loads its models; DenseNet trained like ResNet18."""
    return ptq.load(name, MODELS[name])


class Made:
    """What one tool made from one origin: its quantized model, {form: path}, and {form: why not} for the rest."""

    def __init__(self):
        self.model = None
        self.paths: dict[str, Path] = {}
        self.missing: dict[str, str] = {}

    def attempt(self, form: str, write) -> None:
        try:
            self.paths[form] = Path(write())
        except Exception as e:  # the reason goes under the table
            self.missing[form] = str(ptq.Failed(e))


def deployed(made: Made, form: str, runtime: str) -> Path | None:
    """The file a tool deploys as `form` in `runtime`: lowbit's .onnx for OpenVINO is the one written for it."""
    return made.paths.get(f"{form}@{runtime}") or made.paths.get(form)


def fp32_forms(model, example: torch.Tensor, workdir: Path, tag: str) -> dict[str, Path]:
    """The FP32 baselines, also the ONNX origin: openvino.convert_model of the module (.xml) and
    torch.onnx.export of it (.onnx; BatchNorm folded into Conv, as a user's FP32 ONNX model has it)."""
    import openvino as ov

    paths = {"xml": workdir / f"{tag}_fp32.xml", "onnx": workdir / f"{tag}_fp32.onnx"}
    ov.save_model(ov.convert_model(model, example_input=example), str(paths["xml"]))
    torch.onnx.export(copy.deepcopy(model).eval(), (example,), str(paths["onnx"]), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return paths


def quantize_and_write(tool: str, origin: str, source, items: list, workdir: Path, tag: str,
                       model_type: str | None) -> Made:
    """Quantize `source` (an nn.Module or the FP32 ModelProto) with `tool` and write its deployment forms."""
    import openvino as ov

    made = Made()
    stem = workdir / f"{tag}_{tool}_{origin}"
    example = items[0]
    try:
        if tool == "lowbit":
            data = items if origin == "torch" else [x.numpy() for x in items]
            made.model = lowbit.quantize(copy.deepcopy(source) if origin == "torch" else source,
                                         lowbit.Dataset(data), model_type=model_type)
        else:
            import nncf

            kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
            if origin == "torch":
                data = items
            else:
                input_name = source.graph.input[0].name
                data = [{input_name: x.numpy()} for x in items]
            made.model = nncf.quantize(copy.deepcopy(source) if origin == "torch" else source,
                                       nncf.Dataset(data), **kwargs)
    except Exception as e:
        made.missing = {form: str(ptq.Failed(e)) for form in ("xml", "onnx")}
        return made
    q = made.model
    xml, onnx_path = f"{stem}.xml", f"{stem}.onnx"
    if tool == "lowbit":  # the .onnx lowbit writes for OpenVINO (runtime="openvino"), from either origin
        made.attempt("onnx@OpenVINO", lambda: lowbit.export(q, f"{stem}.ov.onnx", runtime="openvino"))
    if origin == "onnx":
        made.attempt("onnx", lambda: (onnx.save(q, onnx_path), onnx_path)[1])
        if tool == "lowbit":
            made.attempt("xml", lambda: lowbit.export(q, xml))
        else:
            made.attempt("xml", lambda: (ov.save_model(ov.convert_model(onnx_path), xml), xml)[1])
    elif tool == "lowbit":
        made.attempt("xml", lambda: lowbit.export(q, xml))
        made.attempt("onnx", lambda: lowbit.export(q, onnx_path))
    else:
        import nncf

        made.attempt("xml", lambda: (ov.save_model(ov.convert_model(q, example_input=example), xml), xml)[1])

        def nncf_onnx():
            stripped = nncf.strip(q, example_input=example)
            torch.onnx.export(stripped, (example,), onnx_path, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
            return onnx_path

        made.attempt("onnx", nncf_onnx)
    return made


# -- running the deployed files -----------------------------------------------------------------------------


def logits(path: Path, runtime: str, x: np.ndarray) -> np.ndarray:
    if runtime == "ONNX Runtime":
        return ptq.ort_logits(path, x)
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.output(0)]


# what lies between a FakeQuantize and the Add it feeds when OpenVINO reads QDQ (DequantizeLinear's Convert,
# Subtract, Multiply) or lowbit's IR (a Reshape of a per-channel range)
_DEQUANTIZE_OPS = ("Convert", "Subtract", "Multiply", "Reshape")


def residual_branch_quantizers(model) -> list:
    """The FakeQuantize ops of an openvino.Model whose output reaches an Add (through dequantization only)."""
    found = []
    for fq in (op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"):
        stack, seen = [fq], set()
        while stack:
            users = [t.get_node() for t in stack.pop().output(0).get_target_inputs()]
            if any(u.get_type_name() == "Add" for u in users):
                found.append(fq)
                break
            fresh = [u for u in users if u.get_type_name() in _DEQUANTIZE_OPS and id(u) not in seen]
            seen.update(id(u) for u in fresh)
            stack += fresh
    return found


def ov_logits_rounding_kept(path: Path, x: np.ndarray) -> np.ndarray:
    """OpenVINO's logits (f32 hint) with its residual Conv fusion blocked: each FakeQuantize that feeds an Add is
    also made a model output. (OpenVINO's CPU plugin fuses Conv -> FakeQuantize -> Add -> FakeQuantize into one
    Convolution and drops the first FakeQuantize's rounding there, nodes/conv.cpp: "drop rounding one special
    residual pattern"; a FakeQuantize whose output is also a model output is not fused.)"""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.add_outputs([fq.output(0) for fq in residual_branch_quantizers(model)])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.output(0)]


def int8_structure(path: Path, runtime: str) -> tuple[int, int, list[str]]:
    """(INT8 layers, all conv/matmul layers, the others as "Type name (precision)") of what the runtime runs."""
    if runtime == "OpenVINO":
        import openvino as ov

        core = ov.Core()
        # the model's own conv/matmul ops: a fused kernel (a "Subgraph", e.g. attention) made of them counts too
        layers = {op.get_friendly_name() for op in core.read_model(str(path)).get_ops()
                  if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul", "ScaledDotProductAttention")}
        compiled = core.compile_model(str(path), "CPU")
        int8, total, fp = 0, 0, []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind not in OV_LAYERS and layers & set(info["originalLayersNames"].astype(str).split(",")):
                kind = f"{kind}[MatMul]"
            if kind in OV_LAYERS or kind.endswith("[MatMul]"):
                total += 1
                precision = info["runtimePrecision"].astype(str)
                if precision in ("u8", "i8"):
                    int8 += 1
                else:
                    fp.append(f"{kind} {op.get_friendly_name()} ({precision})")
        return int8, total, fp
    nodes = ort_optimized(path).graph.node
    int8 = sum(n.op_type in ORT_INTEGER_OPS for n in nodes)
    fp = [f"{n.op_type} {n.name}" for n in nodes if n.op_type in ORT_FLOAT_LAYERS]
    return int8, int8 + len(fp), fp


def accuracy_rows(name: str, tools: list[str], workdir: Path) -> list[dict]:
    """Top-1, agreement and INT8 execution of every deployment of one model, at its own resolution."""
    spec = MODELS[name]
    model, x_train, x_test, y = load(name)
    items = [x_train[i:i + 1].clone() for i in range(N_CALIB)]
    x = x_test.numpy()
    fp32 = fp32_forms(model, items[0], workdir, name)
    fp32_onnx = onnx.load(fp32["onnx"])
    made = {(tool, origin): quantize_and_write(tool, origin, model if origin == "torch" else fp32_onnx, items,
                                               workdir, name, spec["model_type"])
            for tool in tools for origin in ("torch", "onnx")}
    references, quantized = {}, {}
    for (tool, origin), m in made.items():
        if m.model is not None:  # the tool's torch model, or its QDQ model run in ONNX Runtime
            references[tool, origin] = (ptq.torch_logits(m.model, x_test) if origin == "torch"
                                        else ptq.ort_logits(m.model, x))
        if "onnx" in m.paths:  # the layers it quantized, counted in its QDQ file
            quantized[tool, origin] = len(quantized_layers(onnx.load(m.paths["onnx"])))
    rows, fp32_top1 = [], {}
    for origin, form, runtime in DEPLOYMENTS:
        if (form, runtime) not in fp32_top1:
            fp32_top1[form, runtime] = ptq.top1(logits(fp32[form], runtime, x), y)
        row = dict(model=name, origin=origin, form=form, runtime=runtime, fp32_top1=fp32_top1[form, runtime])
        for tool in tools:
            m = made[tool, origin]
            path = deployed(m, form, runtime)
            if path is None:
                row[f"{tool}_missing"] = m.missing.get(f"{form}@{runtime}") or m.missing.get(form, "n/a")
                continue
            try:
                got = logits(path, runtime, x)
                row[f"{tool}_int8"] = int8_structure(path, runtime)
            except Exception as e:
                row[f"{tool}_missing"] = f"cannot run in {runtime}: {ptq.Failed(e)}"
                continue
            row[f"{tool}_top1"] = ptq.top1(got, y)
            row[f"{tool}_quantized"] = quantized.get((tool, origin))
            if (tool, origin) in references and not (origin == "onnx" and runtime == "ONNX Runtime"):
                ref = references[tool, origin]
                row[f"{tool}_agree"], row[f"{tool}_sqnr"] = ptq.agreement(ref, got), ptq.sqnr_db(ref, got)
                if runtime == "OpenVINO":
                    row[f"{tool}_sqnr_kept"] = ptq.sqnr_db(ref, ov_logits_rounding_kept(path, x))
        rows.append(row)
    return rows


def latency_rows(name: str, tools: list[str], rounds: int, processes: int, workdir: Path) -> list[dict]:
    """Batch-1 latency of every deployment of one model (CNNs at 224x224), FP32 and INT8, in fresh processes."""
    spec = MODELS[name]
    model, x_train, _, _ = load(name)
    x = x_train[:N_CALIB_LATENCY]
    if spec["latency"]:  # the CNNs: captured, calibrated and run at 224x224
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    items = [x[i:i + 1].clone() for i in range(len(x))]
    tag = f"{name}_lat"
    fp32 = fp32_forms(model, items[0], workdir, tag)
    fp32_onnx = onnx.load(fp32["onnx"])
    made = {(tool, origin): quantize_and_write(tool, origin, model if origin == "torch" else fp32_onnx, items,
                                               workdir, tag, spec["model_type"])
            for tool in tools for origin in ("torch", "onnx")}
    np.save(workdir / "input.npy", items[0].numpy())
    measured, notes = {}, {}
    for runtime in ("OpenVINO", "ONNX Runtime"):
        specs = {f"fp32|{form}": fp32[form] for form in ("xml", "onnx") if runtime == "OpenVINO" or form == "onnx"}
        for origin, form, rt in DEPLOYMENTS:
            for tool in tools:
                if rt == runtime and (path := deployed(made[tool, origin], form, rt)) is not None:
                    specs[f"{tool}|{origin}|{form}"] = path
        try:
            measured[runtime] = run_latency(specs, runtime, workdir / "input.npy", rounds, processes)
        except RuntimeError as e:
            notes[runtime] = str(e)
    rows = []
    for origin, form, runtime in DEPLOYMENTS:
        row = dict(model=name, origin=origin, form=form, runtime=runtime,
                   size="x".join(map(str, items[0].shape[2:])))
        got = measured.get(runtime, {})
        keys = {"fp32": f"fp32|{form}", **{tool: f"{tool}|{origin}|{form}" for tool in tools}}
        for who, key in keys.items():
            if key in got:
                row[f"{who}_ms"] = 1000 * float(np.median(sum(got[key]["seconds"], [])))
                row[f"{who}_rounds"] = got[key]["seconds"]
                row[f"{who}_graph"] = got[key]["exec_graph"]
            elif who != "fp32":
                row[f"{who}_missing"] = notes.get(runtime) or made[who, origin].missing.get(form, "n/a")
        for a, b in (("lowbit", "nncf"), ("fp32", "lowbit"), ("fp32", "nncf")):
            if f"{a}_rounds" in row and f"{b}_rounds" in row:  # round by round: the quartiles show the noise
                ratios = [np.median(p) / np.median(q) for p, q in zip(row[f"{a}_rounds"], row[f"{b}_rounds"])]
                row[f"{a}/{b}_q"] = tuple(float(v) for v in np.percentile(ratios, [25, 75]))
        if "lowbit_graph" in row and "nncf_graph" in row:
            row["same_graph"] = row["lowbit_graph"] == row["nncf_graph"]
        rows.append(row)
    return rows


def run_latency(specs: dict[str, Path], runtime: str, input_path: Path, rounds: int, processes: int) -> dict:
    """bench/ov_latency.py in `processes` fresh processes, each starting at another model; rounds pooled."""
    keys = list(specs)
    pooled = {k: {"seconds": []} for k in keys}
    for p in range(processes):
        order = keys[p % len(keys):] + keys[:p % len(keys)]
        proc = subprocess.run([sys.executable, str(HERE / "ov_latency.py"), str(input_path), str(rounds)]
                              + [f"{k}={PREFIX[runtime]}:{specs[k]}" for k in order], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/ov_latency.py ({runtime}) failed: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        for k, m in json.loads(proc.stdout).items():
            pooled[k]["seconds"] += m["seconds"]
            pooled[k]["exec_graph"] = m["exec_graph"]
            pooled[k]["shape"] = m["shape"]
    return pooled


# -- checks and tables --------------------------------------------------------------------------------------


def _where(r: dict) -> str:
    return f"{r['model']} {r['origin']}->.{r['form']} in {r['runtime']}"


def checks(acc: list[dict], lat: list[dict], use_nncf: bool) -> list[list[str]]:
    out = []
    for r in acc:
        if "lowbit_int8" in r:
            int8, total, _ = r["lowbit_int8"]
            quantized = r.get("lowbit_quantized")
            # a runtime may fuse layers into one kernel (OpenVINO: attention MatMuls into a Subgraph), so the
            # target is every layer it runs, or every layer quantized in the file where that is fewer
            ok = quantized is not None and quantized > 0 and int8 >= min(total, quantized)
            out.append([_where(r), f"{int8} INT8 of {total} layers; {quantized} quantized in the file",
                        "every quantized layer runs as INT8", "PASS" if ok else "FAIL"])
        else:
            out.append([_where(r), r.get("lowbit_missing", "-"), "every quantized layer runs as INT8", "FAIL"])
        if "lowbit_agree" in r:
            ok = r["lowbit_agree"] >= AGREE_MIN and r["lowbit_sqnr"] >= SQNR_MIN
            kept = r.get("lowbit_sqnr_kept")
            blocked = f" ({kept:.1f} dB with OpenVINO's residual fusion blocked)" if kept is not None else ""
            out.append([_where(r) + " vs " + ("torch simulation" if r["origin"] == "torch" else "QDQ in ORT"),
                        f"{r['lowbit_agree']:.2f}%, {r['lowbit_sqnr']:.1f} dB{blocked}",
                        f"agreement >= {AGREE_MIN}%, >= {SQNR_MIN:.0f} dB", "PASS" if ok else "FAIL"])
    for r in lat:
        lb = r.get("lowbit_ms")
        if use_nncf:
            nn = r.get("nncf_ms")
            if lb is None or nn is None:
                out.append([_where(r), "lowbit " + ("-" if lb is None else f"{lb:.2f} ms") + ", NNCF "
                            + ("n/a" if nn is None else f"{nn:.2f} ms"), "lowbit/NNCF latency <= 1.00",
                            "FAIL" if lb is None else "n/a"])
            else:
                q = r["lowbit/nncf_q"]
                same = {True: "; same exec graph", False: "; exec graphs differ"}.get(r.get("same_graph"), "")
                out.append([_where(r), f"{lb / nn:.3f} (round IQR {q[0]:.3f}-{q[1]:.3f}){same}",
                            "lowbit/NNCF latency <= 1.00", "PASS" if lb / nn <= 1.0 else "FAIL"])
        if r["model"] == "resnet18":
            ok = lb is not None and lb < r["fp32_ms"]
            out.append([_where(r), "-" if lb is None else f"FP32/INT8 = {r['fp32_ms'] / lb:.2f}x",
                        "ResNet18 INT8 faster than FP32", "PASS" if ok else "FAIL"])
    return out


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _note(notes: list[str], text: str) -> str:
    notes.append(text)
    return f"[{len(notes)}]"


def _int8_cell(r: dict, tool: str, notes: list[str]) -> str:
    int8, total, fp = r[f"{tool}_int8"]
    cell = f"{int8}/{total}"
    if fp:
        shown = "; ".join(fp[:6]) + (f"; ... ({len(fp) - 6} more)" if len(fp) > 6 else "")
        cell += " " + _note(notes, f"{tool}, {_where(r)}: not INT8: {shown}")
    return cell


def tables(acc: list[dict], lat: list[dict], check_rows: list[list[str]], tools: list[str]) -> list[tuple]:
    out = []
    head = ["model", "origin", "form", "runtime", "FP32 top-1"]
    for tool in tools:
        label = "lowbit" if tool == "lowbit" else "NNCF"
        head += [f"{label} INT8 top-1", f"{label} INT8 layers", f"{label} agree %", f"{label} SQNR dB"]
    body, notes = [], []
    for r in acc:
        cells = [r["model"], r["origin"], f".{r['form']}", r["runtime"], f"{r['fp32_top1']:.2f}"]
        for tool in tools:
            if f"{tool}_top1" not in r:
                cells += [_note(notes, f"{tool}, {_where(r)}: {r.get(f'{tool}_missing', 'n/a')}"), "-", "-", "-"]
                continue
            cells += [f"{r[f'{tool}_top1']:.2f}", _int8_cell(r, tool, notes), _f(r.get(f"{tool}_agree"), ".2f"),
                      _f(r.get(f"{tool}_sqnr"), ".1f")]
        body.append(cells)
    out.append(("INT8 execution and accuracy at the models' own resolution: top-1 % on 450 held-out digits in the "
                "row's runtime (OpenVINO with the f32 hint); INT8 layers = conv/FC/matmul layers OpenVINO runs in "
                "u8/i8, or ONNX Runtime integer kernels, of all conv/matmul/gemm layers it runs; agreement (top-1 %, "
                "output SQNR) of each tool's deployed model with its torch model (torch origin) or its QDQ model in "
                "ONNX Runtime (ONNX origin)", head, body, notes))

    head = ["model", "origin", "form"]
    for tool in tools:
        label = "lowbit" if tool == "lowbit" else "NNCF"
        head += [f"{label} SQNR dB as deployed", f"{label} SQNR dB, fusion blocked"]
    body = [[r["model"], r["origin"], f".{r['form']}"]
            + [_f(r.get(f"{tool}_{key}"), ".1f") for tool in tools for key in ("sqnr", "sqnr_kept")]
            for r in acc if r["runtime"] == "OpenVINO" and any(f"{tool}_sqnr_kept" in r for tool in tools)]
    out.append(("OpenVINO's residual fusion: output SQNR against the same reference as above, as deployed and with "
                "the fusion blocked. OpenVINO's CPU plugin fuses Conv -> FakeQuantize -> Add -> FakeQuantize into "
                "one Convolution and drops the rounding of the first FakeQuantize there (nodes/conv.cpp, \"drop "
                "rounding one special residual pattern\"), so the deployed model adds a branch the simulation "
                "rounds unrounded; blocked = each FakeQuantize that feeds an Add also made a model output, which "
                "OpenVINO does not fuse", head, body, []))

    head = ["model", "origin", "form", "runtime", "input", "FP32 ms", "lowbit INT8 ms"]
    if "nncf" in tools:
        head += ["NNCF INT8 ms", "lowbit/NNCF (round IQR)", "same exec graph"]
    head += ["FP32/lowbit (round IQR)"] + (["FP32/NNCF"] if "nncf" in tools else [])
    body, notes = [], []
    for r in lat:
        lb, fp, nn = r.get("lowbit_ms"), r.get("fp32_ms"), r.get("nncf_ms")
        cells = [r["model"], r["origin"], f".{r['form']}", r["runtime"], r["size"], _f(fp, ".2f"),
                 _f(lb, ".2f") if lb else _note(notes, f"lowbit, {_where(r)}: {r.get('lowbit_missing')}")]
        if "nncf" in tools:
            q = r.get("lowbit/nncf_q")
            cells += [_f(nn, ".2f") if nn else "n/a " + _note(notes, f"NNCF, {_where(r)}: {r.get('nncf_missing')}"),
                      f"{lb / nn:.3f} ({q[0]:.3f}-{q[1]:.3f})" if lb and nn else "-",
                      {True: "yes", False: "no"}.get(r.get("same_graph"), "-")]
        q = r.get("fp32/lowbit_q")
        cells.append(f"{fp / lb:.2f}x ({q[0]:.2f}-{q[1]:.2f})" if lb and fp else "-")
        if "nncf" in tools:
            cells.append(f"{fp / nn:.2f}x" if nn and fp else "-")
        body.append(cells)
    out.append(("Latency, batch 1, CNNs at 224x224 and the ViT at 8x8, default CPU settings of each runtime (OpenVINO's "
                "FP32 models run in its default inference precision, see the header); median "
                "ms of interleaved rounds in fresh processes; ratios with the quartiles of the per-round ratio; FP32 "
                "= openvino.convert_model of the module (.xml) or torch.onnx.export of it (.onnx)", head, body, notes))
    out.append(("Checks", ["where", "measured", "target", "result"], check_rows, []))
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="ResNet18 only (or the first of --models), few rounds")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF columns")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the markdown file (default {RESULTS})")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=200)
    warnings.filterwarnings("ignore")
    tools = compared_tools(console, args.no_nncf)
    use_nncf = "nncf" in tools
    models = (args.models[:1] if "--models" in (argv or []) else ["resnet18"]) if args.quick else args.models
    rounds, processes = (3, 1) if args.quick else (8, 3)
    header = machine_line()
    console.print(header, markup=False, highlight=False)
    acc, lat = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            console.log(f"{name}: accuracy and INT8 execution")
            acc += accuracy_rows(name, tools, Path(tmp))
            console.log(f"{name}: latency")
            lat += latency_rows(name, tools, rounds, processes, Path(tmp))
    check_rows = checks(acc, lat, use_nncf)
    markdown = ptq.render(tables(acc, lat, check_rows, tools), console)
    console.log(f"done in {time.perf_counter() - start:.0f} s")
    if not args.quick:
        write_results(args.out, "Deployable INT8: lowbit vs NNCF", "bench/deploy.py", argv, header, markdown)
        console.print(f"Markdown tables: {args.out}")
    return acc + lat


def compared_tools(console, no_nncf: bool) -> list[str]:
    """["lowbit", "nncf"], or ["lowbit"] with --no-nncf or where NNCF is not installed (said on `console`);
    NNCF's torch extension is built here, before anything is timed (ptq.prepare_nncf)."""
    if no_nncf:
        return ["lowbit"]
    try:
        import nncf  # noqa: F401
    except ImportError:
        console.print("[yellow]nncf is not installed: NNCF columns skipped (make .venv/.bench)[/]")
        return ["lowbit"]
    ptq.prepare_nncf(console)
    return ["lowbit", "nncf"]


def write_results(out: Path, title: str, script: str, argv, header: str, markdown: str) -> None:
    """`out`: the title, the command that made it, the machine line, and ptq.render's tables without its own
    title."""
    body = markdown[markdown.index("**"):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([
        f"# {title}", "", f"Generated by `python {script}{' ' + ' '.join(argv) if argv else ''}`; see its docstring "
        "for the method.", "", f"Machine: {header}", "", body]) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
