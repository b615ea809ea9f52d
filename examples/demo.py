"""The main job on bundled data: a digits-trained CNN through lowbit and back out three ways.

Lowers the model into lowbit's IR, prints a summary of the graph, writes it
back as a torch module, an ONNX model and OpenVINO IR, and shows that all
three agree with the original (accuracy on the held-out digits and the largest
difference in logits). Run with `make demo`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits import accuracy, load_digits_split, trained  # noqa: E402

import lowbit  # noqa: E402
from lowbit.ir.openvino import save_openvino  # noqa: E402


def main() -> None:
    _, _, x_test, y_test = load_digits_split()
    model = trained("digits_cnn")
    print(f"digits CNN, FP32 top-1 on {len(x_test)} held-out images: {accuracy(model, x_test, y_test):.4f}")

    start = time.perf_counter()
    graph = lowbit.lower(model, example_inputs=(x_test[:1],))
    print(f"\nlowered in {time.perf_counter() - start:.2f} s: {len(graph)} nodes, "
          f"{len(graph.constants)} constants, input {graph.inputs[0].shape}")
    print("ops:", ", ".join(f"{op} x{n}" for op, n in Counter(n.op_type for n in graph).most_common()))
    print("\nfirst lines of the text form:")
    print("\n".join(str(graph).splitlines()[:8]))

    x = x_test.numpy()
    with torch.no_grad():
        want = model(x_test).numpy()
    out = Path(tempfile.mkdtemp(prefix="lowbit-demo-"))
    results = {}
    with torch.no_grad():
        results["torch"] = lowbit.codegen(graph, "torch")(x_test).numpy()
    onnx_model = lowbit.codegen(graph, "onnx")
    (out / "digits.onnx").write_bytes(onnx_model.SerializeToString())
    results["onnx (ORT)"] = ort.InferenceSession(str(out / "digits.onnx")).run(None, {graph.inputs[0].name: x})[0]
    save_openvino(graph, out / "digits.xml")  # FP32 weights (openvino.save_model would halve them to FP16)
    compiled = ov.Core().compile_model(str(out / "digits.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results["openvino"] = compiled(x)[0]

    print(f"\nwritten to {out}")
    print(f"{'backend':<12} {'top-1':>7} {'max |logit diff|':>18} {'same argmax':>12}")
    for name, logits in results.items():
        acc = float((logits.argmax(1) == y_test.numpy()).mean())
        agree = float((logits.argmax(1) == want.argmax(1)).mean())
        print(f"{name:<12} {acc:>7.4f} {np.abs(logits - want).max():>18.2e} {agree:>12.2%}")


if __name__ == "__main__":
    main()
