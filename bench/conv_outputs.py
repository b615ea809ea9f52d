"""What target_device="CPU_ORT" trades: quantized Conv outputs (ONNX Runtime's QLinearConv) against NNCF's placement.

ONNX Runtime has no integer convolution with a float output. With NNCF's
placement (lowbit's default, ANY) a Conv whose output feeds a SiLU, HardSwish
or Sigmoid has no quantizer on that output, and ONNX Runtime runs it as
DequantizeLinear -> Conv in float; CPU_ORT adds the quantizer (lowbit/quant/
placement.py, step 5). This bench measures both placements on the models that
have such convs, side by side in one run:

- Models (tests/zoo_models.py, size "full", random weights): EfficientNet-B0
  (SiLU, squeeze-excite) and MobileNetV2 (ReLU6, no such conv: the control,
  whose two files must be the same).
- Quantization: `lowbit.quantize(model, 64 random 224x224 images,
  target_device=...)`, NNCF's `nncf.quantize` with the same items beside it.
- Accuracy: output SQNR against FP32 on 16 held-out inputs (torch).
- ONNX Runtime layers: the conv/matmul kernels of its optimized graph that are
  integer (QLinearConv, QGemm, MatMulIntegerToFloat, QLinearMatMul) and float
  (Conv, FusedConv, Gemm, FusedGemm, MatMul).
- Latency, batch 1, 224x224: bench/ov_latency.py, interleaved rounds in 2 fresh
  processes; the lowbit .onnx in ONNX Runtime, the lowbit .xml in OpenVINO.

    python bench/conv_outputs.py [--models efficientnet mobilenet_v2] [--rounds N] [--no-nncf]
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

import deploy  # noqa: E402  (puts examples/ and tests/ on sys.path)
import ptq  # noqa: E402
import lowbit  # noqa: E402
import side_by_side  # noqa: E402
from deploy_checks import ort_optimized_ops  # noqa: E402
from zoo_models import build  # noqa: E402

RESULTS = HERE / "results" / "conv_outputs.md"
MODELS = ["efficientnet", "mobilenet_v2"]
DEVICES = ["ANY", "CPU_ORT"]
N_CALIB, N_EVAL, ROUNDS, PROCESSES = 64, 16, 20, 2
INTEGER_KERNELS = ("QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul")
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul")


def sqnr(module, reference: np.ndarray, held_out: list) -> float:
    with torch.no_grad():
        return ptq.sqnr_db(reference, np.concatenate([module(x).numpy() for x in held_out]))


def model_rows(name: str, tools: list[str], rounds: int, workdir: Path, console) -> list[dict]:
    module, make_input, _ = build(name, "full")
    items, held_out = [make_input(1) for _ in range(N_CALIB)], [make_input(1) for _ in range(N_EVAL)]
    with torch.no_grad():
        reference = np.concatenate([module(x).numpy() for x in held_out])
    rows, onnx_files, xml_files = [], {}, {}
    for device in DEVICES:
        q = lowbit.quantize(module, lowbit.Dataset(items), subset_size=N_CALIB, target_device=device)
        onnx_files[device] = lowbit.export(q, workdir / f"{name}_{device}.onnx")
        xml_files[device] = lowbit.export(q, workdir / f"{name}_{device}.xml")
        ops = ort_optimized_ops(onnx_files[device])
        rows.append({"model": name, "device": device, "sqnr": sqnr(q, reference, held_out),
                     "quantizers": sum(n.op_type == "FakeQuantize" for n in q.lowbit_graph),
                     "ort_int8": sum(ops[op] for op in INTEGER_KERNELS),
                     "ort_float": sum(ops[op] for op in FLOAT_KERNELS)})
        console.log(f"{name} {device}: {rows[-1]}")
    if "nncf" in tools:
        import nncf

        n = nncf.quantize(copy.deepcopy(module), nncf.Dataset(items), subset_size=N_CALIB)
        rows.append({"model": name, "device": "NNCF (ANY)", "sqnr": sqnr(n, reference, held_out)})
    x = make_input(1).numpy()
    np.save(workdir / f"{name}_x.npy", x)
    for runtime, key, files in (("ONNX Runtime", "ort", onnx_files), ("OpenVINO", "ov", xml_files)):
        pooled = deploy.run_latency(files, runtime, workdir / f"{name}_x.npy", rounds, PROCESSES)
        for row in rows[:len(DEVICES)]:
            row[f"{key}_ms"] = 1000 * float(np.median([np.median(r) for r in pooled[row["device"]]["seconds"]]))
    return rows


def tables(rows: list[dict]) -> list[tuple]:
    head = ["model", "placement", "quantizers", "ONNX Runtime layers integer / float", "SQNR vs FP32 dB",
            "ONNX Runtime ms", "OpenVINO ms"]
    body = []
    for r in rows:
        kernels = f"{r['ort_int8']} / {r['ort_float']}" if "ort_int8" in r else "-"
        body.append([r["model"], r["device"], ptq._f(r.get("quantizers"), "d"), kernels, ptq._f(r["sqnr"], ".1f"),
                     ptq._f(r.get("ort_ms"), ".2f"), ptq._f(r.get("ov_ms"), ".2f")])
    title = (f"ANY (NNCF's placement) against CPU_ORT (quantized Conv outputs), batch 1 at 224x224; SQNR on "
             f"{N_EVAL} held-out inputs; latency: median of interleaved rounds in {PROCESSES} fresh processes")
    return [(title, head, body, [])]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-nncf", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run = side_by_side.Run("conv_outputs.py", argv, args.no_nncf)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += model_rows(name, run.tools, args.rounds, Path(tmp), run.console)
    run.write(args.out, "Quantized Conv outputs for ONNX Runtime (CPU_ORT) against NNCF's placement",
              f"{N_CALIB} calibration items.", tables(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
