"""Prune, fine-tune, quantize: the workflow for a model that is still too slow after INT8.

Trains (once; cached) a residual CNN on scikit-learn's digits at 32x32, then
at each step prints parameters, MACs per image, test accuracy and OpenVINO
latency (batch 1, default config):

1. FP32, as trained;
2. lowbit.prune(model, 0.5): half the filters of every channel group removed,
   physically (the classifier keeps its 10 outputs);
3. the pruned model fine-tuned for a few epochs in an ordinary training loop
   (Adam, lr 1e-3 annealed; its BatchNorms train as the original's did);
4. lowbit.quantize on 300 calibration images, written as OpenVINO IR.

    python examples/prune_then_quantize.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import openvino as ov

sys.path.insert(0, str(Path(__file__).parent))
from demo import latency_ms  # noqa: E402
from digits import accuracy, load_digits_split, train, trained  # noqa: E402

import lowbit  # noqa: E402
from lowbit.api import graph_of  # noqa: E402
from lowbit.pruning import cost  # noqa: E402

OUT = Path("out/prune_then_quantize")
SIZE, FT_EPOCHS = 32, 5


def main() -> None:
    x_train, y_train, x_test, y_test = load_digits_split(size=SIZE)
    model = trained("digits_resnet", epochs=12, size=SIZE, cosine=True)
    example = (x_test[:1],)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []

    def step(label, module, graph, xml):
        c = cost(graph)
        acc = accuracy(module, x_test, y_test)
        ms = latency_ms(xml, x_test[:1].numpy(), runs=200)
        rows.append((label, c.params, c.macs, acc, ms))
        print(f"{label:<32} {c.params:>9,} params {c.macs / 1e6:>7.2f} MMACs  top-1 {acc:.4f}  {ms:.3f} ms")

    step("FP32", model, lowbit.lower(model, example),
         lowbit.export(model, OUT / "fp32.xml", example_inputs=example))

    start = time.perf_counter()
    pruned = lowbit.prune(model, 0.5, example_inputs=example)
    seconds = time.perf_counter() - start
    step(f"pruned 50% ({seconds:.2f} s)", pruned, graph_of(pruned), lowbit.export(pruned, OUT / "pruned.xml"))

    train(pruned, x_train, y_train, epochs=FT_EPOCHS, lr=1e-3, cosine=True)
    step(f"pruned + {FT_EPOCHS} epochs fine-tuning", pruned, graph_of(pruned),
         lowbit.export(pruned, OUT / "pruned_finetuned.xml"))

    calibration = lowbit.Dataset([x_train[i:i + 1] for i in range(300)])
    quantized = lowbit.quantize(pruned, calibration, target_device="CPU")
    xml = lowbit.export(quantized, OUT / "pruned_int8.xml")
    step("pruned + fine-tuned + INT8", quantized, graph_of(quantized), xml)
    ov_top1 = float((ov.Core().compile_model(str(xml), "CPU")(x_test.numpy())[0].argmax(1) == y_test.numpy()).mean())
    print(f"\nINT8 .xml in OpenVINO: top-1 {ov_top1:.4f}; "
          f"{rows[0][4] / rows[-1][4]:.2f}x faster than FP32, {rows[-1][1] / rows[0][1]:.1%} of its parameters")
    print(f"models: {OUT}/")


if __name__ == "__main__":
    main()
