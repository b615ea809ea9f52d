"""CPU latency of several models in OpenVINO or ONNX Runtime, measured side by side in a clean process.

bench/ptq.py and bench/deploy.py run this as a subprocess: in the process that
just quantized the models (torch threads, NNCF, converted models in memory)
the same IR files ran up to 1% apart in either direction, and a model compiled
later ran slightly faster than one compiled earlier. Here every model is
compiled (OpenVINO) or opened as a session (ONNX Runtime) twice, in palindrome
order (A B C C B A), so that all have the same mean load position; the
instances run synchronous inferences (batch 1, the runtime's default CPU
settings: OpenVINO's default config, ONNX Runtime's default SessionOptions on
CPUExecutionProvider; warmed up) in interleaved rounds of 5 inferences whose
order rotates each round, so a noisy neighbour slows all alike. Give one
runtime per process: ONNX Runtime's worker threads spin after each run and
would slow an OpenVINO instance that runs next.

    python bench/ov_latency.py INPUT.npy ROUNDS NAME=[ov:|ort:]MODEL [NAME=[ov:|ort:]MODEL ...]

MODEL is a path (.xml, or .onnx, which OpenVINO also reads); "ort:" runs it
in ONNX Runtime, "ov:" or no prefix in OpenVINO. Prints JSON: {"NAME":
{"shape": "[?,3,224,224]", "seconds": [[round 0 samples], ...], "exec_graph":
[[layer type, primitive, precision, fused layer count], ...]}, ...}; the
execution graph (what OpenVINO's CPU plugin runs, after its fusions; ONNX
Runtime: [op type, domain, "", 1] of its optimized graph) shows whether two
models can differ in speed at all.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

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


def _openvino(path: str):
    """(run(x), input shape, execution graph) of an OpenVINO model compiled for CPU with the default config."""
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU")
    request = compiled.create_infer_request()
    return (lambda x: request.infer([x])), str(compiled.input(0).get_partial_shape()), execution_graph(compiled)


def _onnxruntime(path: str):
    """(run(x), input shape, optimized graph's ops) of an ONNX Runtime CPU session with default SessionOptions."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()  # the defaults a user gets; the optimized graph is only written out
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = [[n.op_type, n.domain, "", 1] for n in onnx.load(options.optimized_model_filepath).graph.node]
    name = session.get_inputs()[0].name
    shape = "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in session.get_inputs()[0].shape) + "]"
    return (lambda x: session.run(None, {name: x})), shape, graph


def load(spec: str):
    """"ort:PATH" in ONNX Runtime; "ov:PATH" or "PATH" in OpenVINO."""
    kind, _, path = spec.partition(":") if spec.startswith(("ov:", "ort:")) else ("ov", ":", spec)
    return (_onnxruntime if kind == "ort" else _openvino)(path)


def measure(models: dict[str, str], x: np.ndarray, rounds: int) -> dict:
    order = list(models) + list(reversed(models))
    instances = []
    result = {name: {"shape": None, "seconds": [[] for _ in range(rounds)]} for name in models}
    for name in order:
        run, shape, graph = load(models[name])
        result[name]["shape"] = shape
        result[name]["exec_graph"] = graph
        for _ in range(WARMUP):
            run(x)
        instances.append((name, run))
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
    rounds = int(argv[1])
    models = dict(arg.split("=", 1) for arg in argv[2:])
    json.dump(measure(models, x, rounds), sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
