"""Post-training INT8 quantization, lowbit side by side with NNCF: accuracy, agreement, PTQ time, OpenVINO latency.

Models: torchvision's ResNet18 and MobileNetV2 (tests/models.py) trained on
3-channel 32x32 digits, and a small ViT trained on 1-channel 8x8 digits
(examples/digits.py; trained once, weights cached under ~/.cache/lowbit;
the CNNs with a cosine lr schedule: MobileNetV2 needs it to pass 95%, and
ResNet18 ended at 96.7% with a constant lr where it reaches 99.6%).
Calibration: the first 300 training images, one sample per item with a batch
dim of 1 (NNCF's convention); the same list goes to `lowbit.Dataset` and
`nncf.Dataset` (numpy arrays for the ONNX path, which NNCF wants as
{input_name: array}). Both tools run with their defaults (target device ANY,
fast bias correction on); for the ViT both get model_type "transformer", as
NNCF's documentation asks for transformers.

1. Accuracy: FP32 and INT8 top-1 on the 450 held-out images, and the output
   SQNR of INT8 logits against FP32 logits, 10*log10(sum(fp32^2) /
   sum((fp32 - int8)^2)), on the torch path (nn.Module in, fake-quantized
   module out, run in torch) and on the ONNX path (FP32 ONNX from
   lowbit.codegen in, QDQ ONNX out, run in ONNX Runtime).
2. PTQ wall time: each quantize call runs twice on the same model and data;
   "cold" is the first call of its kind in the process (imports, JIT and
   torch.export warm-up included), "warm" the second. Ratios use warm times.
3. Agreement: lowbit's torch-path model exported to ONNX QDQ and OpenVINO IR;
   top-1 agreement and output SQNR of ONNX Runtime and of OpenVINO (compiled
   with INFERENCE_PRECISION_HINT f32) against the torch simulation.
4. Latency at 224x224 (ResNet18, MobileNetV2): the digits models quantized
   again from 64 training images upsampled to 224 (a model for 224 inputs is
   captured at 224; this part measures speed only, so 64 samples suffice).
   lowbit: `lowbit.export(.xml)`. NNCF: its torch path, then
   `openvino.convert_model(model, example_input=x)` and `ov.save_model`, the
   deployment path NNCF's PyTorch docs show. FP32: `openvino.convert_model` of
   the torch module. OpenVINO default config on CPU, batch 1, synchronous
   infer requests, warmed up, measured by bench/ov_latency.py in 4 fresh
   processes (each compiles the models in a rotated order; within one,
   palindrome compile order and interleaved rotating rounds: see its
   docstring), pooled; each model reports the median of its samples, and the
   quartiles of the per-round ratios show how much of a difference is noise.
   The table also says whether lowbit's and NNCF's models compile to the same
   OpenVINO execution graph (layer types, kernels, precisions, fusions).
5. Checks: PASS/FAIL for each figure the issue asks for.

NNCF's torch path compiles a C++ extension on first use (once per machine);
the bench builds and loads it before any timing (see `prepare_nncf`).

Tables are printed and written as Markdown to bench/results/ptq.md.

    python bench/ptq.py [--models resnet18 mobilenet_v2 vit] [--quick] [--no-nncf] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
for _sub in ("examples", "tests"):
    if str(ROOT / _sub) not in sys.path:
        sys.path.insert(0, str(ROOT / _sub))

import lowbit  # noqa: E402
from digits import load_digits_split, trained  # noqa: E402
from models import TinyViT, mobilenet_v2, resnet18  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ptq.md"
N_CALIB = 300
N_CALIB_224 = 64
ACC_TOL = 0.5  # points of top-1
AGREE_MIN, AGREE_SQNR_MIN = 99.5, 35.0
TIME_RATIO_MIN = 3.0
FP32_SPEEDUP_MIN = 1.8
LATENCY_PROCESSES = 4  # latency runs in this many fresh processes, pooled (see bench/ov_latency.py)

# name -> how it is built and trained; epochs chosen so FP32 top-1 on the held-out split is >= ~95%
MODELS = {
    # a converged FP32 baseline: ResNet18 ends at 96.7% with examples/digits.train's constant lr, 99.6% with its
    # cosine schedule; MobileNetV2 underfits with the constant lr (78% after 20 epochs)
    "resnet18": dict(factory=lambda: resnet18(num_classes=10), epochs=15, size=32, channels=3,
                     model_type=None, latency=True, schedule="cosine"),
    "mobilenet_v2": dict(factory=lambda: mobilenet_v2(num_classes=10), epochs=40, size=32, channels=3,
                         model_type=None, latency=True, schedule="cosine"),
    "vit": dict(factory=lambda: TinyViT(num_classes=10), epochs=30, size=8, channels=1,
                model_type="transformer", latency=False),
}


# -- measuring ---------------------------------------------------------------------------------------------


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(np.sum((ref - test) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(float(np.sum(ref ** 2)) / noise))


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    return 100 * float((np.asarray(logits).argmax(1) == y).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return 100 * float((np.asarray(a).argmax(1) == np.asarray(b).argmax(1)).mean())


def over_seeds(runs: list[float]) -> str:
    """A top-1 trained once per seed, as a table cell: the mean, then each seed's run in brackets."""
    return f"{np.mean(runs):.2f} [{' '.join(f'{v:.2f}' for v in runs)}]"


def torch_logits(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    return (out[0] if isinstance(out, (tuple, list)) else out).detach().numpy()


def ort_session(model_or_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_logits(model_or_path, x: np.ndarray) -> np.ndarray:
    session = ort_session(model_or_path)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class Failed:
    """What a quantize call that raised leaves in a table cell."""

    def __init__(self, exc: BaseException):
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # OpenVINO's conversion errors open with where the check failed; the ops it could not convert come later
        said = [line for line in lines if "No conversion rule found" in line or "Conversion is failed" in line]
        first = "; ".join(said) or (lines[0] if lines else "")
        self.reason = f"{type(exc).__name__}: {first}"[:200]
        self.trace = traceback.format_exc()

    def __str__(self) -> str:
        return f"failed ({self.reason})"


def cold_warm(fn, model, profile: bool = False):
    """Run `fn(copy of model)` twice: (warm result or Failed, cold seconds, warm seconds, profile text).

    Each call gets its own copy of the model, made before the clock starts.
    """
    try:
        arg = copy.deepcopy(model)
        _, cold = timed(lambda: fn(arg))
        arg = copy.deepcopy(model)
        if profile:
            prof = cProfile.Profile()
            prof.enable()
        result, warm = timed(lambda: fn(arg))
        text = None
        if profile:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
            text = buf.getvalue()
        return result, cold, warm, text
    except Exception as e:  # a tool that cannot quantize this model: its reason goes in the table
        return Failed(e), None, None, None


# -- the parts of the bench --------------------------------------------------------------------------------


def load(name: str, spec: dict | None = None):
    """(model, x_train, x_test, y_test) of MODELS[name] (or `spec`), trained on digits or from the cache."""
    spec = spec or MODELS[name]
    model = trained(name, factory=spec["factory"], epochs=spec["epochs"], size=spec["size"],
                    channels=spec["channels"], cosine=spec.get("schedule") == "cosine")
    x_train, _, x_test, y_test = load_digits_split(size=spec["size"], channels=spec["channels"])
    return model, x_train, x_test, y_test.numpy()


def accuracy_and_time(name: str, use_nncf: bool, profile: bool) -> tuple[list[dict], dict]:
    """Torch and ONNX path rows for one model; also returns lowbit's torch-path model for the agreement part."""
    spec = MODELS[name]
    model, x_train, x_test, y = load(name)
    items = [x_train[i:i + 1].clone() for i in range(N_CALIB)]
    torch_row, lb = path_row(name, "torch", model, items, items, lambda m: torch_logits(m, x_test), y, use_nncf,
                             profile)
    fp32_onnx = lowbit.codegen(lowbit.lower(model, (x_test[:1],)), "onnx")
    input_name = fp32_onnx.graph.input[0].name
    np_items = [t.numpy() for t in items]
    xt = x_test.numpy()
    onnx_row, _ = path_row(name, "onnx", fp32_onnx, np_items, [{input_name: a} for a in np_items],
                           lambda m: ort_logits(m, xt), y, use_nncf, profile)
    return [torch_row, onnx_row], dict(model=model, qmodel=lb, x_test=x_test)


def path_row(name: str, path: str, model, items: list, nncf_items: list, run, y: np.ndarray, use_nncf: bool,
             profile: bool) -> tuple[dict, object]:
    """One accuracy/time row: lowbit and NNCF on the same model and data; `run` gives a model's test logits."""
    model_type = MODELS[name]["model_type"]
    fp32 = run(model)
    row = dict(table="accuracy", model=name, path=path, fp32_top1=top1(fp32, y))
    lb, row["lowbit_cold_s"], row["lowbit_s"], prof = cold_warm(
        lambda m: lowbit.quantize(m, lowbit.Dataset(items), model_type=model_type), model, profile)
    _fill(row, "lowbit", lb, run, fp32, y)
    if prof:
        row["lowbit_profile"] = prof
    if use_nncf:
        import nncf

        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
        nq, row["nncf_cold_s"], row["nncf_s"], _ = cold_warm(
            lambda m: nncf.quantize(m, nncf.Dataset(nncf_items), **kwargs), model)
        _fill(row, "nncf", nq, run, fp32, y)
    return row, lb


def _fill(row: dict, tool: str, qmodel, run, fp32: np.ndarray, y: np.ndarray) -> None:
    if isinstance(qmodel, Failed):
        row[f"{tool}_error"] = qmodel.reason
        row[f"{tool}_trace"] = qmodel.trace
        return
    logits = run(qmodel)
    row[f"{tool}_top1"] = top1(logits, y)
    row[f"{tool}_sqnr"] = sqnr_db(fp32, logits)


def agreement_row(name: str, made: dict, workdir: Path) -> dict:
    """ONNX Runtime and OpenVINO runs of lowbit's exported torch-path model against its torch simulation."""
    import openvino as ov

    row = dict(table="agreement", model=name)
    qmodel = made["qmodel"]
    if isinstance(qmodel, Failed):
        row["error"] = qmodel.reason
        return row
    x = made["x_test"]
    sim = torch_logits(qmodel, x)
    try:
        onnx_path = lowbit.export(qmodel, workdir / f"{name}_int8.onnx")
        xml_path = lowbit.export(qmodel, workdir / f"{name}_int8.xml")
        ort_out = ort_logits(onnx_path, x.numpy())
        compiled = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        ov_out = compiled(x.numpy())[0]
    except Exception as e:
        row["error"] = Failed(e).reason
        return row
    row.update(ort_agree=agreement(sim, ort_out), ort_sqnr=sqnr_db(sim, ort_out),
               ov_agree=agreement(sim, ov_out), ov_sqnr=sqnr_db(sim, ov_out))
    return row


def latency_row(name: str, use_nncf: bool, runs: int, workdir: Path) -> dict:
    """OpenVINO CPU latency at 224x224, batch 1: FP32, lowbit INT8, NNCF INT8, measured in interleaved rounds."""
    import openvino as ov

    model, x_train, _, _ = load(name)
    x224 = F.interpolate(x_train[:N_CALIB_224], size=(224, 224), mode="bilinear", align_corners=False)
    items = [x224[i:i + 1].clone() for i in range(N_CALIB_224)]
    example = items[0]
    row = dict(table="latency", model=name)
    paths = {}
    fp32_ov = ov.convert_model(model, example_input=example)
    paths["fp32"] = workdir / f"{name}_224_fp32.xml"
    ov.save_model(fp32_ov, str(paths["fp32"]))
    try:
        lb = lowbit.quantize(copy.deepcopy(model), lowbit.Dataset(items))
        paths["lowbit"] = lowbit.export(lb, workdir / f"{name}_224_lowbit.xml")
    except Exception as e:
        row["lowbit_error"] = Failed(e).reason
    if use_nncf:
        import nncf

        try:
            nq = nncf.quantize(copy.deepcopy(model), nncf.Dataset(items))
            paths["nncf"] = workdir / f"{name}_224_nncf.xml"
            ov.save_model(ov.convert_model(nq, example_input=example), str(paths["nncf"]))
        except Exception as e:
            row["nncf_error"] = Failed(e).reason
    np.save(workdir / "input.npy", example.numpy())
    keys = list(paths)
    per_process = max(1, runs // (10 * LATENCY_PROCESSES))
    seconds = {key: [] for key in keys}
    for p in range(LATENCY_PROCESSES):  # each process compiles the models in a rotated order
        order = keys[p % len(keys):] + keys[:p % len(keys)]
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ov_latency.py")),
                               str(workdir / "input.npy"), str(per_process)]
                              + [f"{key}={paths[key]}" for key in order], capture_output=True, text=True)
        if proc.returncode != 0:
            row["lowbit_error"] = f"bench/ov_latency.py failed: {proc.stderr.strip().splitlines()[-1:]}"
            return row
        measured = json.loads(proc.stdout)
        for key, m in measured.items():
            row[f"{key}_shape"] = m["shape"]
            row[f"{key}_exec"] = m["exec_graph"]
            seconds[key] += m["seconds"]
    for key, rounds in seconds.items():
        row[f"{key}_ms"] = 1000 * float(np.median(sum(rounds, [])))
    if "lowbit" in seconds:
        for key in ("fp32", "nncf"):
            if key in seconds:  # the ratio round by round: its quartiles say how much of a difference is noise
                ratios = [np.median(a) / np.median(b) for a, b in zip(seconds[key], seconds["lowbit"])]
                row[f"{key}_ratio_q"] = tuple(float(q) for q in np.percentile(ratios, [25, 75]))
        if "nncf" in seconds:
            row["same_exec_graph"] = row["lowbit_exec"] == row["nncf_exec"]
    return row


# -- the checks ---------------------------------------------------------------------------------------------


def checks(rows: list[dict], use_nncf: bool) -> list[dict]:
    out = []

    def check(figure: str, value: str, target: str, ok: bool | None) -> None:
        out.append(dict(table="checks", figure=figure, value=value, target=target,
                        result="n/a" if ok is None else ("PASS" if ok else "FAIL")))

    for r in (r for r in rows if r["table"] == "accuracy"):
        where = f"{r['model']} / {r['path']}"
        if "lowbit_top1" in r:
            drop = r["fp32_top1"] - r["lowbit_top1"]
            check(f"accuracy {where}", f"FP32 - INT8 = {drop:+.2f} pts", f"<= {ACC_TOL} pts", drop <= ACC_TOL)
        else:
            check(f"accuracy {where}", f"lowbit {r.get('lowbit_error')}", f"<= {ACC_TOL} pts", False)
        if use_nncf:
            if r.get("lowbit_s") and r.get("nncf_s"):
                ratio = r["nncf_s"] / r["lowbit_s"]
                check(f"PTQ time {where}", f"NNCF / lowbit = {ratio:.2f}x (warm)", f">= {TIME_RATIO_MIN}x",
                      ratio >= TIME_RATIO_MIN)
            else:
                check(f"PTQ time {where}", "no ratio: a tool failed", f">= {TIME_RATIO_MIN}x",
                      None if "lowbit_s" in r and r.get("lowbit_s") else False)
    for r in (r for r in rows if r["table"] == "agreement"):
        if "error" in r:
            check(f"agreement {r['model']}", r["error"], f">= {AGREE_MIN}%, >= {AGREE_SQNR_MIN} dB", False)
            continue
        for rt, label in (("ort", "ONNX Runtime"), ("ov", "OpenVINO")):
            ok = r[f"{rt}_agree"] >= AGREE_MIN and r[f"{rt}_sqnr"] >= AGREE_SQNR_MIN
            check(f"agreement {r['model']} {label} vs torch", f"{r[f'{rt}_agree']:.2f}%, {r[f'{rt}_sqnr']:.1f} dB",
                  f">= {AGREE_MIN}%, >= {AGREE_SQNR_MIN} dB", ok)
    for r in (r for r in rows if r["table"] == "latency"):
        lb = r.get("lowbit_ms")
        if use_nncf:
            nn_ms = r.get("nncf_ms")
            if lb is None or nn_ms is None:
                check(f"latency {r['model']} vs NNCF INT8", "-", ">= 1.00x", False if lb is None else None)
            else:
                q = r.get("nncf_ratio_q", (nn_ms / lb,) * 2)
                same = {True: "; same execution graph", False: "; execution graphs differ"}.get(r.get("same_exec_graph"), "")
                value = f"NNCF / lowbit = {nn_ms / lb:.3f}x (round IQR {q[0]:.3f}-{q[1]:.3f}){same}"
                result = "PASS" if nn_ms / lb >= 1.0 else ("TIE" if q[1] >= 1.0 else "FAIL")
                out.append(dict(table="checks", figure=f"latency {r['model']} vs NNCF INT8", value=value,
                                target=">= 1.00x (TIE: median below, upper quartile of round ratios above)",
                                result=result))
        if r["model"] == "resnet18":
            ok = lb is not None and r["fp32_ms"] / lb >= FP32_SPEEDUP_MIN
            check("latency resnet18 vs FP32", "-" if lb is None else f"FP32 / lowbit = {r['fp32_ms'] / lb:.2f}x",
                  f">= {FP32_SPEEDUP_MIN}x", ok)
    return out


# -- tables -------------------------------------------------------------------------------------------------


def _f(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def _quartiles(r: dict, key: str) -> str:
    q = r.get(f"{key}_ratio_q")
    return f" ({q[0]:.3f}-{q[1]:.3f})" if q else ""


def _short(reason: str, notes: list[str], where: str) -> str:
    """A failure's table cell: "failed [n]", with the reason as note n under the table."""
    notes.append(f"{where}: {reason}")
    return f"failed [{len(notes)}]"


def _tool_cells(r: dict, tool: str, notes: list[str]) -> list[str]:
    if f"{tool}_error" in r:
        return [_short(r[f"{tool}_error"], notes, f"{tool}, {r['model']} / {r['path']}"), "-", "-", "-"]
    return [_f(r.get(f"{tool}_top1"), ".2f"), _f(r.get(f"{tool}_sqnr"), ".1f"),
            _f(r.get(f"{tool}_cold_s"), ".2f"), _f(r.get(f"{tool}_s"), ".2f")]


def tables(rows: list[dict], use_nncf: bool) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    head = ["model", "path", "FP32 top-1"] + ["lowbit INT8 top-1", "lowbit SQNR dB", "lowbit PTQ cold s",
                                               "lowbit PTQ warm s"]
    if use_nncf:
        head += ["NNCF INT8 top-1", "NNCF SQNR dB", "NNCF PTQ cold s", "NNCF PTQ warm s", "NNCF/lowbit time (warm)"]
    body, notes = [], []
    for r in (r for r in rows if r["table"] == "accuracy"):
        cells = [r["model"], r["path"], f"{r['fp32_top1']:.2f}"] + _tool_cells(r, "lowbit", notes)
        if use_nncf:
            ratio = r["nncf_s"] / r["lowbit_s"] if r.get("nncf_s") and r.get("lowbit_s") else None
            cells += _tool_cells(r, "nncf", notes) + ["-" if ratio is None else f"{ratio:.2f}x"]
        body.append(cells)
    out.append((f"PTQ accuracy and time: {N_CALIB} calibration samples; top-1 % on 450 held-out digits; SQNR of "
                "INT8 vs FP32 logits; wall time of one quantize call, cold = first in process, warm = second",
                head, body, notes))

    body, notes = [], []
    for r in (r for r in rows if r["table"] == "agreement"):
        if "error" in r:
            body.append([r["model"], _short(r["error"], notes, f"export/run of {r['model']}"), "-", "-", "-"])
        else:
            body.append([r["model"], f"{r['ort_agree']:.2f}", f"{r['ort_sqnr']:.1f}", f"{r['ov_agree']:.2f}",
                         f"{r['ov_sqnr']:.1f}"])
    if body:
        out.append(("Agreement of lowbit's exported torch-path INT8 model with its torch simulation "
                    "(OpenVINO with INFERENCE_PRECISION_HINT f32)",
                    ["model", "ORT top-1 agree %", "ORT SQNR dB", "OpenVINO top-1 agree %", "OpenVINO SQNR dB"], body,
                    notes))

    body, notes = [], []
    for r in (r for r in rows if r["table"] == "latency"):
        lb, fp, nn_ms = r.get("lowbit_ms"), r.get("fp32_ms"), r.get("nncf_ms")
        cells = [r["model"], _f(fp, ".2f"), _f(lb, ".2f") if lb else _short(r.get("lowbit_error"), notes, "lowbit"),
                 f"{fp / lb:.2f}x{_quartiles(r, 'fp32')}" if lb else "-"]
        if use_nncf:
            cells += [_f(nn_ms, ".2f") if nn_ms else _short(r.get("nncf_error"), notes, "NNCF"),
                      f"{nn_ms / lb:.3f}x{_quartiles(r, 'nncf')}" if lb and nn_ms else "-",
                      {True: "yes", False: "no"}.get(r.get("same_exec_graph"), "-")]
        cells.append(" / ".join(r.get(f"{k}_shape", "-") for k in ("fp32", "lowbit", "nncf") if use_nncf or k != "nncf"))
        body.append(cells)
    if body:
        head = ["model", "FP32 ms", "lowbit INT8 ms", "FP32/lowbit (round IQR)"]
        if use_nncf:
            head += ["NNCF INT8 ms", "NNCF/lowbit (round IQR)", "same OV execution graph as NNCF"]
        head.append("input shapes (FP32 / lowbit" + (" / NNCF)" if use_nncf else ")"))
        out.append((f"OpenVINO CPU latency at 224x224, batch 1, default config, median (INT8 models calibrated on "
                    f"{N_CALIB_224} upsampled images; FP32 = openvino.convert_model of the torch module)", head, body, notes))

    body = [[r["figure"], r["value"], r["target"], r["result"]] for r in rows if r["table"] == "checks"]
    out.append(("Checks against the issue's figures", ["figure", "measured", "target", "result"], body, []))
    return out


def render(all_tables, console) -> str:
    from rich.table import Table

    md = ["# PTQ: lowbit vs NNCF", "", "Generated by `python bench/ptq.py`; see its docstring for the method.", ""]
    for title, head, body, notes in all_tables:
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
        for cells in body:
            style = {"FAIL": "red", "PASS": "green", "TIE": "yellow"}.get(cells[-1])
            table.add_row(*cells, style=style)
        console.print(table)
        for i, note in enumerate(notes, 1):
            console.print(f"  [{i}] {note}", markup=False, highlight=False)
        md += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
        md += [""] + [f"[{i}] {note}  " for i, note in enumerate(notes, 1)] + ([""] if notes else [])
    return "\n".join(md)


def prepare_nncf(console) -> None:
    """Build and load NNCF's torch C++ extension before any clock starts.

    NNCF compiles it on first use (once per machine, cached under
    ~/.cache/torch_extensions) and gives up after 60 s; on a slow or busy
    machine that fails the first torch-path quantize. The build is not part of
    quantization, so the timeout is lifted and the build happens here.
    """
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
    try:
        from nncf.torch.quantization.extensions import QuantizedFunctionsCPU

        _, seconds = timed(lambda: QuantizedFunctionsCPU.get("Quantize_forward"))
        console.log(f"NNCF torch extension loaded in {seconds:.1f} s (not counted in PTQ times)")
    except Exception as e:  # NNCF falls back on its reference functions; its quantize calls will say more
        console.log(f"NNCF torch extension not loaded: {type(e).__name__}: {e}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="fewer latency iterations")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF columns")
    parser.add_argument("--profile", action="store_true", help="cProfile lowbit's warm quantize calls")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=160)
    use_nncf = not args.no_nncf
    if use_nncf:
        try:
            import nncf  # noqa: F401
        except ImportError:
            console.print("[yellow]nncf is not installed: NNCF columns skipped (pip install -e .[bench])[/]")
            use_nncf = False
    warnings.filterwarnings("ignore")
    if use_nncf:
        prepare_nncf(console)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        made = {}
        for name in args.models:
            console.log(f"{name}: accuracy and PTQ time")
            model_rows, made[name] = accuracy_and_time(name, use_nncf, args.profile)
            rows += model_rows
        for name in args.models:
            console.log(f"{name}: agreement")
            rows.append(agreement_row(name, made[name], workdir))
        for name in (n for n in args.models if MODELS[n]["latency"]):
            console.log(f"{name}: latency at 224x224")
            rows.append(latency_row(name, use_nncf, 50 if args.quick else 300, workdir))
    rows += checks(rows, use_nncf)
    markdown = render(tables(rows, use_nncf), console)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown + "\n")
    console.print(f"Markdown tables: {RESULTS}")
    for r in rows:
        if r.get("lowbit_profile"):
            console.print(f"\n[bold]cProfile of lowbit.quantize, {r['model']} / {r['path']} (warm):[/]")
            console.print(r["lowbit_profile"], markup=False, highlight=False)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
