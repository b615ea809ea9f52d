"""Quantization-aware training where post-training quantization loses too much: 4-bit weights, 8-bit activations.

Trains (once; cached) the residual CNN of examples/digits.py on scikit-learn's digits at 32x32, then prints the
test accuracy at each stage:

1. FP32, as trained;
2. W4A8 post-training quantization (lowbit.quantize with bits={"weights": 4, "activations": 8});
3. the same quantized module trained for a few epochs in an ordinary training loop (QAT: straight-through
   gradients, the quantizers' ranges learned with the weights), BatchNorms merged while they train
   (fold_bn="train": folded exactly at export);
4. lowbit.strip: a plain torch module (torch.fake_quantize_* ops), and the OpenVINO IR it exports to, run in
   OpenVINO, with its top-1 agreement with the QAT module.

    python examples/qat.py [--epochs N] [--lsq]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch

sys.path.insert(0, str(Path(__file__).parent))
from digits import accuracy, load_digits_split, train, trained  # noqa: E402

import lowbit  # noqa: E402
from lowbit.train.controller import QAT_PASSES  # noqa: E402  (no bias correction, Dropouts kept)

OUT = Path("out/qat")
SIZE = 32
BITS = {"weights": 4, "activations": 8}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lsq", action="store_true", help="learn step sizes (LSQ) instead of range ends")
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = load_digits_split(size=SIZE)
    model = trained("digits_resnet", epochs=12, size=SIZE, cosine=True)
    calibration = lowbit.Dataset([x_train[i:i + 32] for i in range(0, 320, 32)])
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"{'FP32':<44} top-1 {accuracy(model, x_test, y_test):.4f}")

    ptq = lowbit.quantize(model, calibration, bits=BITS)
    print(f"{'W4A8 post-training quantization':<44} top-1 {accuracy(ptq, x_test, y_test):.4f}")

    learning = "lsq" if args.lsq else "range"
    start = time.perf_counter()
    qat = lowbit.compile(model, QAT_PASSES, dataset=calibration, bits=BITS,
                         fold_bn="train", range_learning=learning, progress=False)
    train(qat, x_train, y_train, epochs=args.epochs, lr=1e-4)
    seconds = time.perf_counter() - start
    label = f"W4A8 QAT, {args.epochs} epochs ({learning}, {seconds:.0f} s)"
    print(f"{label:<44} top-1 {accuracy(qat, x_test, y_test):.4f}")

    plain = lowbit.strip(qat)
    print(f"{'stripped (torch.fake_quantize_* ops)':<44} top-1 {accuracy(plain, x_test, y_test):.4f}")
    xml = lowbit.export(qat, OUT / "qat.xml")
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = np.concatenate([compiled(x_test[i:i + 64].numpy())[0] for i in range(0, len(x_test), 64)])
    with torch.no_grad():
        simulated = qat(x_test).argmax(1).numpy()
    ov_top1 = float((logits.argmax(1) == y_test.numpy()).mean())
    agreement = float((logits.argmax(1) == simulated).mean())
    print(f"{'OpenVINO (' + xml.name + ')':<44} top-1 {ov_top1:.4f}  agreement with QAT {agreement:.4f}")


if __name__ == "__main__":
    main()
