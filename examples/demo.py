"""The main job on bundled data: post-training INT8 quantization of a digits-trained CNN.

Trains (once; cached) a small CNN on scikit-learn's digits, quantizes it with
lowbit's default pipeline (cleanup, fold_bn, fuse, quantize,
fast_bias_correction) on 300 calibration images, then prints FP32 vs INT8
accuracy in torch, ONNX Runtime and OpenVINO, the time quantization took,
OpenVINO FP32 vs INT8 latency, and where the pass-by-pass dumps are.
Run with `make demo`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits import accuracy, load_digits_split, trained  # noqa: E402

import lowbit  # noqa: E402

OUT = Path("out/demo")


def top1(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y.numpy()).mean())


def latency_ms(path: Path, x: np.ndarray, runs: int = 300) -> float:
    """Median latency of one synchronous inference with OpenVINO's default config."""
    compiled = ov.Core().compile_model(str(path), "CPU")
    request = compiled.create_infer_request()
    for _ in range(20):
        request.infer([x])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer([x])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    x_train, _, x_test, y_test = load_digits_split()
    model = trained("digits_cnn")
    calibration = lowbit.Dataset([x_train[i:i + 1] for i in range(300)])

    start = time.perf_counter()
    qmodel = lowbit.compile(model, dataset=calibration, hw="CPU", dump_dir=OUT / "dumps")
    ptq_seconds = time.perf_counter() - start

    OUT.mkdir(parents=True, exist_ok=True)
    lowbit.export(model, OUT / "digits_fp32.xml", example_inputs=(x_test[:1],))
    lowbit.export(qmodel, OUT / "digits_int8.xml")
    lowbit.export(qmodel, OUT / "digits_int8.onnx")

    x = x_test.numpy()
    with torch.no_grad():
        fp32_logits = model(x_test).numpy()
        int8_logits = qmodel(x_test).numpy()
    ort_logits = ort.InferenceSession(str(OUT / "digits_int8.onnx")).run(None, {"x": x})[0]
    ov_core = ov.Core()
    ov_fp32 = ov_core.compile_model(str(OUT / "digits_fp32.xml"), "CPU")(x)[0]
    ov_int8 = ov_core.compile_model(str(OUT / "digits_int8.xml"), "CPU")(x)[0]

    quantizers = sum(isinstance(m, lowbit.backends.torch_fq.FakeQuantize) for m in qmodel.modules())
    print(f"digits CNN, {len(x_test)} held-out images, {quantizers} quantizers inserted")
    print(f"post-training quantization (300 images, capture to torch module): {ptq_seconds:.2f} s\n")
    print(f"{'runtime':<28} {'FP32 top-1':>10} {'INT8 top-1':>10}")
    print(f"{'torch (FakeQuantize)':<28} {accuracy(model, x_test, y_test):>10.4f} {top1(int8_logits, y_test):>10.4f}")
    print(f"{'ONNX Runtime (QDQ)':<28} {'':>10} {top1(ort_logits, y_test):>10.4f}")
    print(f"{'OpenVINO (FakeQuantize)':<28} {top1(ov_fp32, y_test):>10.4f} {top1(ov_int8, y_test):>10.4f}")
    agree = float((int8_logits.argmax(1) == ort_logits.argmax(1)).mean())
    print(f"\nONNX Runtime vs torch simulation: {agree:.2%} same top-1, "
          f"max |logit diff| {np.abs(int8_logits - ort_logits).max():.2e}")

    print("\nOpenVINO latency, default config (median):")
    for batch in (1, 64):
        xb = np.ascontiguousarray(np.repeat(x[:1], batch, axis=0))
        fp32 = latency_ms(OUT / "digits_fp32.xml", xb)
        int8 = latency_ms(OUT / "digits_int8.xml", xb)
        print(f"  batch {batch:>2}: FP32 {fp32:.3f} ms, INT8 {int8:.3f} ms ({fp32 / int8:.2f}x)")
    print(f"\npass-by-pass dumps: {OUT / 'dumps' / 'index.html'} (or `lowbit diff {OUT / 'dumps'}`)")
    print(f"models: {OUT}/digits_int8.onnx, {OUT}/digits_int8.xml")


if __name__ == "__main__":
    main()
