"""HuggingFace transformers architectures at full size, lowbit side by side with NNCF: output SQNR and PTQ time.

Models (tests/zoo_models.py, size "full": each configuration's defaults,
random weights drawn wider than HuggingFace's initialiser for the vision
models, no download): BERT-base, DistilBERT, GPT-2 (124M), Llama at
SmolLM-135M's shape, T5-small's encoder, ViT-B/16, Swin-T, ConvNeXt-T,
ResNet-50, MobileNetV2 1.0, EfficientNet-B0; text models take 128 token
ids, vision models a 224x224 image; the module returns the last hidden state.

Both tools get the same calibration items (N_CALIB random inputs, batch 1),
their defaults, and model_type "transformer" for the transformer models (as
NNCF's documentation asks). Paths:

- torch: the nn.Module in, lowbit's fake-quantized module / NNCF's
  quantized module out, run in torch;
- onnx: the FP32 model exported with torch.onnx.export (dynamo=False; where
  torch cannot export the model, lowbit.export's FP32 ONNX, said in the
  table), QDQ model out, run in ONNX Runtime.

Figures: output SQNR of INT8 against FP32 on N_EVAL held-out inputs,
10*log10(sum(fp32^2) / sum((fp32 - int8)^2)), and PTQ wall time of one
quantize call on a fresh copy of the model (the first lowbit and the first
NNCF call of the process are warm-up calls on ResNet-50's torch path, not
timed). Checks: every architecture quantizes on both paths with lowbit;
lowbit SQNR >= NNCF SQNR - 0.5 dB on each; median lowbit/NNCF PTQ time <=
0.33.

    python bench/zoo.py [--models bert vit ...] [--calib N] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ptq  # noqa: E402  (puts examples/ and tests/ on sys.path)
import lowbit  # noqa: E402
import side_by_side  # noqa: E402
from zoo_models import ARCHITECTURES, build  # noqa: E402

RESULTS = HERE / "results" / "zoo.md"
N_CALIB, N_EVAL = 64, 16
SQNR_TOL_DB = 0.5
TIME_RATIO_MAX = 0.33


def fp32_onnx(module, example: torch.Tensor, path: Path) -> str:
    """torch.onnx.export's file, or lowbit.export's where torch cannot export the model; says which."""
    try:
        torch.onnx.export(copy.deepcopy(module), (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return "torch.onnx.export"
    except Exception:
        lowbit.export(module, path, example_inputs=(example,))
        return "lowbit.export"


def quantize(tool: str, origin: str, source, items: list, model_type: str | None):
    """(quantized model or ptq.Failed, seconds)."""
    try:
        if tool == "lowbit":
            options = {"model_type": model_type} if model_type else {}
            data = items if origin == "torch" else [x.numpy() for x in items]
            return ptq.timed(lambda: lowbit.quantize(source, lowbit.Dataset(data), subset_size=len(items),
                                                     **options))
        import nncf

        options = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
        if origin == "torch":
            data = items
        else:
            name = source.graph.input[0].name
            data = [{name: x.numpy()} for x in items]
        return ptq.timed(lambda: nncf.quantize(source, nncf.Dataset(data), subset_size=len(items), **options))
    except Exception as e:
        return ptq.Failed(e), None


def outputs(origin: str, model, x: list) -> np.ndarray:
    if origin == "torch":
        with torch.no_grad():
            return np.concatenate([model(xi).numpy() for xi in x])
    session = ptq.ort_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: xi.numpy()})[0] for xi in x])


def rows_for(name: str, tools: list[str], n_calib: int, workdir: Path, console) -> list[dict]:
    module, make_input, model_type = build(name, "full")
    items = [make_input(1) for _ in range(n_calib)]
    held_out = [make_input(1) for _ in range(N_EVAL)]
    onnx_path = workdir / f"{name}_fp32.onnx"
    onnx_source = fp32_onnx(module, items[0], onnx_path)
    fp32 = {"torch": outputs("torch", module, held_out), "onnx": outputs("onnx", str(onnx_path), held_out)}
    rows = []
    for origin in ("torch", "onnx"):
        row = {"model": name, "origin": origin, "source": onnx_source if origin == "onnx" else "nn.Module"}
        for tool in tools:
            source = copy.deepcopy(module) if origin == "torch" else onnx.load(onnx_path)
            q, seconds = quantize(tool, origin, source, items, model_type)
            if isinstance(q, ptq.Failed):
                row[f"{tool}_failed"] = q.reason
                console.log(f"{name} {origin} {tool}: {q.reason}")
                continue
            try:
                got = outputs(origin, q, held_out)
                row[f"{tool}_sqnr"] = ptq.sqnr_db(fp32[origin], got)
            except Exception as e:  # quantized, but the result does not run
                row[f"{tool}_failed"] = ptq.Failed(e).reason
            row[f"{tool}_s"] = seconds
            console.log(f"{name} {origin} {tool}: {row.get(f'{tool}_sqnr', float('nan')):.1f} dB, {seconds:.1f} s")
        rows.append(row)
    return rows


def warm_up(tools: list[str], console) -> None:
    """One untimed call per tool (imports, torch.export and NNCF's first-call costs)."""
    module, make_input, _ = build("resnet", "small")
    items = [make_input(1) for _ in range(4)]
    for tool in tools:
        q, _ = quantize(tool, "torch", copy.deepcopy(module), items, None)
        if isinstance(q, ptq.Failed):
            console.log(f"warm-up {tool}: {q.reason}")


def checks(rows: list[dict], use_nncf: bool) -> list[list[str]]:
    out = []
    for r in rows:
        where = f"{r['model']} {r['origin']}"
        ok = "lowbit_sqnr" in r
        out.append([where, "quantizes and runs" if ok else r.get("lowbit_failed", "?"), "lowbit quantizes",
                    "PASS" if ok else "FAIL"])
        if use_nncf and ok and "nncf_sqnr" in r:
            diff = r["lowbit_sqnr"] - r["nncf_sqnr"]
            out.append([where, f"{r['lowbit_sqnr']:.1f} vs {r['nncf_sqnr']:.1f} dB ({diff:+.1f})",
                        f"lowbit SQNR >= NNCF - {SQNR_TOL_DB} dB", "PASS" if diff >= -SQNR_TOL_DB else "FAIL"])
    ratios = [r["lowbit_s"] / r["nncf_s"] for r in rows if r.get("lowbit_s") and r.get("nncf_s")]
    if use_nncf and ratios:
        median = float(np.median(ratios))
        out.append(["all", f"median {median:.2f} over {len(ratios)} rows", f"lowbit/NNCF PTQ time <= {TIME_RATIO_MAX}",
                    "PASS" if median <= TIME_RATIO_MAX else "FAIL"])
    return out


def tables(rows: list[dict], check_rows: list[list[str]], tools: list[str]):
    cell = side_by_side.Cells(lambda r: f"{r['model']} {r['origin']}")

    head = ["model", "origin", "FP32 ONNX from"] + [f"{t} SQNR dB" for t in tools] + [f"{t} PTQ s" for t in tools]
    if len(tools) == 2:
        head.append("lowbit/NNCF time")
    body = []
    for r in rows:
        cells = [r["model"], r["origin"], r["source"]] + [cell(r, t, "sqnr", ".1f") for t in tools] \
            + [cell(r, t, "s", ".1f") for t in tools]
        if len(tools) == 2:
            both = r.get("lowbit_s") and r.get("nncf_s")
            cells.append(f"{r['lowbit_s'] / r['nncf_s']:.2f}" if both else "-")
        body.append(cells)
    return [("Output SQNR of INT8 vs FP32 (held-out inputs) and PTQ wall time", head, body, cell.notes),
            ("Checks", ["where", "measured", "figure", "result"], check_rows, [])]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--calib", type=int, default=N_CALIB, help=f"calibration items (default {N_CALIB})")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF columns")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    run = side_by_side.Run("zoo.py", argv, args.no_nncf)
    console, tools = run.console, run.tools
    warm_up(tools, console)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += rows_for(name, tools, args.calib, Path(tmp), console)
    run.write(args.out, "transformers architectures: lowbit vs NNCF",
              f"{args.calib} calibration items, {N_EVAL} held-out inputs.",
              tables(rows, checks(rows, "nncf" in tools), tools))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
