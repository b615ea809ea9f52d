"""OpenVINO CPU latency of several IR models, measured side by side in a clean process.

bench/ptq.py runs this as a subprocess: in the process that just quantized the
models (torch threads, NNCF, converted models in memory) the same IR files ran
up to 1% apart in either direction, and a model compiled later ran slightly
faster than one compiled earlier. Here every model is compiled twice, in
palindrome order (A B C C B A), so that all have the same mean compile
position; the instances run synchronous infer requests (batch 1, OpenVINO's
default CPU config, warmed up) in interleaved rounds of 5 inferences whose
order rotates each round, so a noisy neighbour slows all alike.

    python bench/ov_latency.py INPUT.npy ROUNDS NAME=MODEL.xml [NAME=MODEL.xml ...]

prints JSON: {"NAME": {"shape": "[?,3,224,224]", "seconds": [[round 0 samples], ...],
"exec_graph": [[layer type, primitive, precision, fused layer count], ...]}, ...}; the
execution graph (what the CPU plugin runs, after its fusions) shows whether two
models can differ in speed at all.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import openvino as ov

PER_ROUND = 5
WARMUP = 10


def execution_graph(compiled) -> list[list]:
    """The layers the CPU plugin runs, in order, without constants: type, primitive, precision, fused layers."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind != "Const":
            layers.append([kind, info["primitiveType"].astype(str), info["runtimePrecision"].astype(str),
                           len(info["originalLayersNames"].astype(str).split(","))])
    return layers


def measure(models: dict[str, str], x: np.ndarray, rounds: int) -> dict:
    core = ov.Core()
    order = list(models) + list(reversed(models))
    instances = []
    result = {name: {"shape": None, "seconds": [[] for _ in range(rounds)]} for name in models}
    for name in order:
        compiled = core.compile_model(models[name], "CPU")
        result[name]["shape"] = str(compiled.input(0).get_partial_shape())
        result[name]["exec_graph"] = execution_graph(compiled)
        request = compiled.create_infer_request()
        for _ in range(WARMUP):
            request.infer([x])
        instances.append((name, request))
    for r in range(rounds):
        shift = r % len(instances)
        for name, request in instances[shift:] + instances[:shift]:
            for _ in range(PER_ROUND):
                start = time.perf_counter()
                request.infer([x])
                result[name]["seconds"][r].append(time.perf_counter() - start)
    return result


def main(argv: list[str]) -> None:
    x = np.load(argv[0])
    rounds = int(argv[1])
    models = dict(arg.split("=", 1) for arg in argv[2:])
    json.dump(measure(models, x, rounds), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
