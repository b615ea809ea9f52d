"""Deployable INT8, lowbit side by side with NNCF: INT8 execution, agreement, accuracy and latency in OpenVINO and
ONNX Runtime, from both origins.

Models: ResNet18, MobileNetV2 and the ViT as bench/ptq.py trains them, and a
DenseNet-style CNN (tests/models.py DenseNet) trained like ResNet18 (3-channel
32x32 digits, 15 epochs; weights cached under ~/.cache/lowbit).

Origins and forms. torch origin: the nn.Module goes to `lowbit.quantize` /
`nncf.quantize`; lowbit writes `.xml` and `.onnx` with `lowbit.export`; NNCF's
module is written to `.xml` with `openvino.convert_model` (its documented
path; it has no QDQ .onnx export of a torch model here, so that cell is n/a).
ONNX origin: the FP32 ONNX model (`lowbit.codegen`) goes to both tools; their
QDQ models are the `.onnx`, and `lowbit.export` / `openvino.convert_model` of
it the `.xml`. Both tools run with their defaults (target device ANY, fast
bias correction), the ViT with model_type "transformer"; 300 calibration
samples for accuracy, 64 upsampled ones for the 224x224 latency models.

1. INT8 execution (structural, the same on any CPU): OpenVINO: the conv and
   fully-connected layers of the compiled model whose runtime precision is
   u8/i8, of all of them; ONNX Runtime: integer kernels (QLinearConv, QGemm,
   QLinearMatMul, MatMulIntegerToFloat) in its optimized graph, and the float
   Conv/Gemm/MatMul left.
2. Accuracy and agreement on the 450 held-out digits at the models' own
   resolution: top-1 of each deployed form in its runtime (OpenVINO with the
   f32 hint), and for lowbit its top-1 agreement and output SQNR against
   lowbit's torch simulation (torch origin) or the QDQ model in ONNX Runtime
   (ONNX origin).
3. Latency: batch 1, 224x224 for the CNNs (the ViT at its 8x8), the default
   CPU settings a user gets, median of interleaved rounds in fresh processes
   (bench/latency.py; each runtime's models in one process per repetition,
   in a rotated order). lowbit/NNCF <= 1.00 passes; the quartiles of the
   per-round ratio show how much of a difference is noise.
4. Checks: PASS/FAIL for each figure the issue asks for.

Tables are printed and written to bench/results/deploy.md, under a header
naming the CPU and its INT8-relevant ISA flags.

    python bench/deploy.py [--models resnet18 mobilenet_v2 densenet vit] [--quick] [--no-nncf]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import lowbit  # noqa: E402
import ptq  # noqa: E402
from deploy_checks import int8_count, openvino_layer_precisions, ort_optimized_ops  # noqa: E402
from models import DenseNet  # noqa: E402

RESULTS = HERE / "results" / "deploy.md"
N_CALIB, N_CALIB_224 = 300, 64
MODELS = {**ptq.MODELS,
          "densenet": dict(factory=lambda: DenseNet(num_classes=10, in_ch=3), epochs=15, size=32, channels=3,
                           model_type=None, latency=True)}
INTEGER_ORT = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat")
FLOAT_ORT = ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul")
TOP1_AGREE, SQNR_MIN = 99.5, 35.0


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}"
                    for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"))
    import onnxruntime
    import openvino

    versions = f"OpenVINO {openvino.__version__}, ONNX Runtime {onnxruntime.__version__}, torch {torch.__version__}"
    try:
        import nncf

        versions += f", NNCF {nncf.__version__}"
    except ImportError:
        pass
    return f"{name}, {os.cpu_count()} cores; {isa}; {versions}"


def load(name: str):
    """(model, x_train, x_test, y_test) as bench/ptq.py loads its models; DenseNet trained the same way."""
    if name in ptq.MODELS:
        return ptq.load(name)
    spec = MODELS[name]
    model = ptq.trained(name, factory=spec["factory"], epochs=spec["epochs"], size=spec["size"],
                        channels=spec["channels"])
    x_train, _, x_test, y_test = ptq.load_digits_split(size=spec["size"], channels=spec["channels"])
    return model, x_train, x_test, y_test.numpy()


def openvino_logits(path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.output(0)]


def write_forms(tool: str, origin: str, model, items, workdir: Path, model_type) -> dict[str, Path]:
    """Quantize with `tool` from `origin` and write its deployment forms; {form: path}."""
    import openvino as ov

    out = {}
    stem = workdir / f"{tool}_{origin}"
    kw = {"model_type": model_type} if model_type else {}
    if tool == "lowbit":
        q = lowbit.quantize(copy.deepcopy(model), lowbit.Dataset(items), **kw)
        if origin == "onnx":
            onnx.save(q, f"{stem}.onnx")
            out["onnx"] = Path(f"{stem}.onnx")
            out["xml"] = lowbit.export(q, f"{stem}.xml")
        else:
            out["onnx"] = lowbit.export(q, f"{stem}.onnx")
            out["xml"] = lowbit.export(q, f"{stem}.xml")
        return out
    import nncf

    if model_type:
        kw["model_type"] = nncf.ModelType.TRANSFORMER
    if origin == "onnx":  # NNCF's ONNX backend takes {input name: array}
        items = [{model.graph.input[0].name: x} for x in items]
    q = nncf.quantize(copy.deepcopy(model), nncf.Dataset(items), **kw)
    if origin == "onnx":
        onnx.save(q, f"{stem}.onnx")
        out["onnx"] = Path(f"{stem}.onnx")
        ov.save_model(ov.convert_model(f"{stem}.onnx"), f"{stem}.xml")
    else:
        ov.save_model(ov.convert_model(q, example_input=items[0]), f"{stem}.xml")
    out["xml"] = Path(f"{stem}.xml")
    return out


def fp32_forms(model, example: torch.Tensor, workdir: Path, tag: str) -> dict[str, Path]:
    return {"onnx": lowbit.export(model, workdir / f"fp32_{tag}.onnx", example_inputs=(example,)),
            "xml": lowbit.export(model, workdir / f"fp32_{tag}.xml", example_inputs=(example,))}


def onnx_items(items):
    return [x.numpy() for x in items]


DEPLOYMENTS = [("torch", "xml", "OpenVINO"), ("torch", "onnx", "ONNX Runtime"), ("torch", "onnx", "OpenVINO"),
               ("onnx", "onnx", "ONNX Runtime"), ("onnx", "onnx", "OpenVINO"), ("onnx", "xml", "OpenVINO")]


def accuracy_rows(name: str, use_nncf: bool, workdir: Path) -> list[dict]:
    """Top-1, agreement and INT8 structure of every deployment at the model's own resolution."""
    spec = MODELS[name]
    model, x_train, x_test, y_test = load(name)
    items = [x_train[i:i + 1] for i in range(N_CALIB)]
    x = x_test.numpy()
    fp32 = ptq.torch_logits(model, x_test)
    fp32_onnx = lowbit.codegen(lowbit.lower(model, (items[0],)), "onnx")
    sources = {"torch": (model, items), "onnx": (fp32_onnx, onnx_items(items))}
    tools = ["lowbit", "nncf"] if use_nncf else ["lowbit"]
    forms = {}
    for tool in tools:
        for origin, (source, data) in sources.items():
            try:
                forms[tool, origin] = write_forms(tool, origin, source, data, workdir, spec["model_type"])
            except Exception as e:
                forms[tool, origin] = ptq.Failed(e)
    simulation = None
    if not isinstance(forms["lowbit", "torch"], ptq.Failed):
        simulation = ptq.torch_logits(lowbit.quantize(copy.deepcopy(model), lowbit.Dataset(items),
                                                      **({"model_type": spec["model_type"]} if spec["model_type"]
                                                         else {})), x_test)
    rows = []
    for origin, form, runtime in DEPLOYMENTS:
        row = dict(model=name, origin=origin, form=form, runtime=runtime, fp32_top1=ptq.top1(fp32, y_test))
        for tool in tools:
            made = forms[tool, origin]
            if isinstance(made, ptq.Failed) or form not in made:
                row[f"{tool}_note"] = str(made) if isinstance(made, ptq.Failed) else "n/a"
                continue
            path = made[form]
            got = ptq.ort_logits(path, x) if runtime == "ONNX Runtime" else openvino_logits(path, x)
            row[f"{tool}_top1"] = ptq.top1(got, y_test)
            if runtime == "OpenVINO":
                precisions = openvino_layer_precisions(path)
                row[f"{tool}_int8"] = (int8_count(precisions), sum(precisions.values()))
            else:
                ops = ort_optimized_ops(path)
                row[f"{tool}_int8"] = (sum(ops[o] for o in INTEGER_ORT), sum(ops[o] for o in INTEGER_ORT + FLOAT_ORT))
            if tool == "lowbit":
                reference = simulation if origin == "torch" else ptq.ort_logits(made["onnx"], x)
                if reference is not None and not (origin == "onnx" and runtime == "ONNX Runtime"):
                    row["agree"] = ptq.agreement(reference, got)
                    row["sqnr"] = ptq.sqnr_db(reference, got)
        rows.append(row)
    return rows


def latency_rows(name: str, use_nncf: bool, rounds: int, processes: int, workdir: Path) -> list[dict]:
    spec = MODELS[name]
    model, x_train, _, _ = load(name)
    if spec["latency"]:
        x_train = F.interpolate(x_train[:N_CALIB_224], size=(224, 224), mode="bilinear", align_corners=False)
    items = [x_train[i:i + 1].clone() for i in range(N_CALIB_224)]
    example = items[0]
    fp32 = fp32_forms(model, example, workdir, f"{name}_lat")
    fp32_onnx = onnx.load(fp32["onnx"])
    sources = {"torch": (model, items), "onnx": (fp32_onnx, onnx_items(items))}
    paths = {}
    for tool in (["lowbit", "nncf"] if use_nncf else ["lowbit"]):
        for origin, (source, data) in sources.items():
            try:
                for form, path in write_forms(tool, origin, source, data, workdir, spec["model_type"]).items():
                    paths[tool, origin, form] = path
            except Exception as e:
                print(f"{tool} {origin} {name}: {ptq.Failed(e)}")
    np.save(workdir / "input.npy", example.numpy())
    rows = []
    for runtime, prefix in (("OpenVINO", "ov"), ("ONNX Runtime", "ort")):
        specs = {}
        for origin, form, rt in DEPLOYMENTS:
            if rt != runtime:
                continue
            specs[f"fp32|{origin}|{form}"] = f"{prefix}:{fp32[form]}"
            for tool in ("lowbit", "nncf"):
                if (tool, origin, form) in paths:
                    specs[f"{tool}|{origin}|{form}"] = f"{prefix}:{paths[tool, origin, form]}"
        specs = dict(sorted(specs.items()))
        seconds = {k: [] for k in specs}
        keys = list(specs)
        for p in range(processes):
            order = keys[p % len(keys):] + keys[:p % len(keys)]
            proc = subprocess.run([sys.executable, str(HERE / "latency.py"), str(workdir / "input.npy"), str(rounds)]
                                  + [f"{k}={specs[k]}" for k in order], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench/latency.py failed: {proc.stderr.strip()[-500:]}")
            for k, m in json.loads(proc.stdout).items():
                seconds[k] += m["seconds"]
        for origin, form, rt in DEPLOYMENTS:
            if rt != runtime:
                continue
            row = dict(model=name, origin=origin, form=form, runtime=runtime)
            for tool in ("fp32", "lowbit", "nncf"):
                key = f"{tool}|{origin}|{form}"
                if key in seconds:
                    row[f"{tool}_ms"] = 1000 * float(np.median(sum(seconds[key], [])))
            lb = f"lowbit|{origin}|{form}"
            for other in ("fp32", "nncf"):
                key = f"{other}|{origin}|{form}"
                if lb in seconds and key in seconds:
                    ratios = [np.median(a) / np.median(b) for a, b in zip(seconds[lb], seconds[key])]
                    row[f"lowbit_over_{other}_q"] = tuple(float(q) for q in np.percentile(ratios, [25, 75]))
            rows.append(row)
    return rows


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def _int8(r, tool):
    v = r.get(f"{tool}_int8")
    return f"{v[0]}/{v[1]}" if v else r.get(f"{tool}_note", "")


def checks(acc: list[dict], lat: list[dict], use_nncf: bool) -> list[list[str]]:
    out = []
    for r in acc:
        where = f"{r['model']} {r['origin']}->{r['form']} in {r['runtime']}"
        v = r.get("lowbit_int8")
        if v:
            ok = v[0] > 0 and (r["runtime"] == "OpenVINO" and v[0] == v[1] or r["runtime"] == "ONNX Runtime")
            out.append([where, "quantized layers run as INT8", f"{v[0]}/{v[1]}", "PASS" if ok else "FAIL"])
        if "agree" in r:
            ok = r["agree"] >= TOP1_AGREE and r["sqnr"] >= SQNR_MIN
            out.append([where, f"agreement >= {TOP1_AGREE}% and >= {SQNR_MIN:.0f} dB",
                        f"{r['agree']:.2f}% / {r['sqnr']:.1f} dB", "PASS" if ok else "FAIL"])
    for r in lat:
        where = f"{r['model']} {r['origin']}->{r['form']} in {r['runtime']}"
        if use_nncf and "nncf_ms" in r and "lowbit_ms" in r:
            ratio = r["lowbit_ms"] / r["nncf_ms"]
            out.append([where, "lowbit/NNCF latency <= 1.00", f"{ratio:.3f}", "PASS" if ratio <= 1.0 else "FAIL"])
        if r["model"] == "resnet18" and "lowbit_ms" in r:
            ok = r["lowbit_ms"] < r["fp32_ms"]
            out.append([where, "ResNet18 INT8 faster than FP32", f"{r['fp32_ms'] / r['lowbit_ms']:.2f}x",
                        "PASS" if ok else "FAIL"])
    return out


def render(acc, lat, check_rows, header: str) -> str:
    from rich.console import Console
    from rich.table import Table

    from report import markdown

    t1 = Table(title="INT8 execution and accuracy: top-1 % on 450 held-out digits (OpenVINO with the f32 hint); "
                     "INT8 layers = conv/FC layers OpenVINO runs in u8/i8 of all, or ONNX Runtime integer "
                     "kernels of all conv/gemm/matmul; agreement and SQNR of lowbit against its torch simulation "
                     "(torch origin) or its QDQ model in ONNX Runtime (ONNX origin)")
    for h in ("model", "origin", "form", "runtime", "FP32 top-1", "lowbit top-1", "lowbit INT8 layers",
              "agree %", "SQNR dB", "NNCF top-1", "NNCF INT8 layers"):
        t1.add_column(h)
    for r in acc:
        t1.add_row(r["model"], r["origin"], r["form"], r["runtime"], _f(r["fp32_top1"], ".2f"),
                   _f(r.get("lowbit_top1"), ".2f") or r.get("lowbit_note", ""), _int8(r, "lowbit"),
                   _f(r.get("agree"), ".2f"), _f(r.get("sqnr"), ".1f"),
                   _f(r.get("nncf_top1"), ".2f") or r.get("nncf_note", ""), _int8(r, "nncf"))
    t2 = Table(title="Latency, batch 1, 224x224 (ViT 8x8), default CPU settings, median ms of interleaved rounds "
                     "in fresh processes; ratios with the quartiles of the per-round ratio")
    for h in ("model", "origin", "form", "runtime", "FP32 ms", "lowbit INT8 ms", "NNCF INT8 ms", "lowbit/NNCF",
              "FP32/lowbit"):
        t2.add_column(h)
    for r in lat:
        nq = r.get("lowbit_over_nncf_q")
        fq = r.get("lowbit_over_fp32_q")
        t2.add_row(r["model"], r["origin"], r["form"], r["runtime"], _f(r.get("fp32_ms"), ".2f"),
                   _f(r.get("lowbit_ms"), ".2f"), _f(r.get("nncf_ms"), ".2f") or "n/a",
                   f"{r['lowbit_ms'] / r['nncf_ms']:.3f} ({nq[0]:.3f}-{nq[1]:.3f})" if nq else "",
                   f"{r['fp32_ms'] / r['lowbit_ms']:.2f}x ({1 / fq[1]:.2f}-{1 / fq[0]:.2f})" if fq else "")
    t3 = Table(title="Checks")
    for h in ("where", "check", "measured", "result"):
        t3.add_column(h)
    for row in check_rows:
        t3.add_row(*row)
    console = Console(width=200)
    for t in (t1, t2, t3):
        console.print(t)
    return "\n".join([f"# Deployable INT8: lowbit vs NNCF", "", f"CPU: {header}", "",
                      "Generated by `python bench/deploy.py`; see its docstring for the method.", ""]
                     + [markdown(t) for t in (t1, t2, t3)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="ResNet18 only, few rounds: checks that it runs")
    parser.add_argument("--no-nncf", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    use_nncf = not args.no_nncf
    if use_nncf:
        from rich.console import Console

        ptq.prepare_nncf(Console())
    models = ["resnet18"] if args.quick else args.models
    rounds, processes = (5, 1) if args.quick else (20, 3)
    header = cpu_line()
    print(header)
    acc, lat = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            acc += accuracy_rows(name, use_nncf, Path(tmp))
            lat += latency_rows(name, use_nncf, rounds, processes, Path(tmp))
    text = render(acc, lat, checks(acc, lat, use_nncf), header)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
