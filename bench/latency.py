"""Batch-1 latency of several models in OpenVINO or ONNX Runtime, measured side by side in a clean process.

The method of bench/ov_latency.py, for either runtime: every model is loaded
twice in palindrome order (A B C C B A), so all have the same mean load
position; the instances run synchronous inferences (batch 1, the runtime's
default CPU settings a user gets, warmed up) in interleaved rounds of 5 whose
order rotates each round, so a noisy neighbour slows all alike.

    python bench/latency.py INPUT.npy ROUNDS NAME=ov:MODEL.xml NAME=ort:MODEL.onnx ...

prints JSON: {"NAME": {"seconds": [[round 0 samples], ...]}, ...}.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

PER_ROUND = 5
WARMUP = 10


def runner(spec: str):
    """A function that runs one inference of the model `spec` ("ov:path" or "ort:path") on its argument."""
    kind, path = spec.split(":", 1)
    if kind == "ov":
        import openvino as ov

        request = ov.Core().compile_model(path, "CPU").create_infer_request()
        return lambda x: request.infer([x])
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def measure(models: dict[str, str], x: np.ndarray, rounds: int) -> dict:
    instances = []
    for name in list(models) + list(reversed(models)):
        run = runner(models[name])
        for _ in range(WARMUP):
            run(x)
        instances.append((name, run))
    result = {name: {"seconds": [[] for _ in range(rounds)]} for name in models}
    for r in range(rounds):
        shift = r % len(instances)
        for name, run in instances[shift:] + instances[:shift]:
            for _ in range(PER_ROUND):
                start = time.perf_counter()
                run(x)
                result[name]["seconds"][r].append(time.perf_counter() - start)
    return result


def main(argv: list[str]) -> None:
    x = np.load(argv[0])
    models = dict(arg.split("=", 1) for arg in argv[2:])
    json.dump(measure(models, x, int(argv[1])), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
