"""Hardware configs: per device, which ops run quantized and with which quantizer configs.

`load_hw_config("CPU")` reads `cpu.json` beside this file; `hw=` may also be
the path of a user's own JSON. Every file is validated against `schema.json`;
a config that fails names the field at fault.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import HardwareConfigError
from ..json_file import read_json

HERE = Path(__file__).parent
DEVICES = ("CPU", "GPU", "NPU", "ANY", "CPU_ORT")


@dataclass(frozen=True)
class QuantizerConfig:
    name: str
    bits: int
    mode: str  # "symmetric" | "asymmetric"
    granularity: str  # "per_tensor" | "per_channel"
    narrow_range: bool = False
    signed: bool | None = None

    @property
    def symmetric(self) -> bool:
        return self.mode == "symmetric"

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"


@dataclass(frozen=True)
class OpConfig:
    activations: tuple[QuantizerConfig, ...] = ()
    weights: tuple[QuantizerConfig, ...] = ()
    inputs: tuple[int, ...] | None = None
    unified_scales: bool = False
    propagate: bool = False
    quantized_output: bool = False


@dataclass(frozen=True)
class HwConfig:
    device: str
    ops: dict[str, OpConfig] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        """This config in the JSON form `parse_hw_config` reads (the quantizers the ops use; what a compressed
        model records of the device it was compressed for)."""
        quantizers = {}
        ops = {}
        for op, spec in self.ops.items():
            entry: dict[str, Any] = {}
            for kind in ("activations", "weights"):
                configs = getattr(spec, kind)
                if configs:
                    entry[kind] = [q.name for q in configs]
                    quantizers.update({q.name: q for q in configs})
            if spec.inputs is not None:
                entry["inputs"] = list(spec.inputs)
            entry.update({k: True for k in ("unified_scales", "propagate", "quantized_output") if getattr(spec, k)})
            ops[op] = entry
        return {"device": self.device,
                "quantizers": {name: {"bits": q.bits, "mode": q.mode, "granularity": q.granularity,
                                      "narrow_range": q.narrow_range, "signed": q.signed}
                               for name, q in sorted(quantizers.items())},
                "ops": ops}

    def op(self, op_type: str) -> OpConfig | None:
        return self.ops.get(op_type)


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads((HERE / "schema.json").read_text())


def _validate(data: Any, where: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise HardwareConfigError(f"hardware config {where} is invalid at {path}: {e.message}. "
                                  f"See lowbit/hw_configs/schema.json for the format")


def parse_hw_config(data: dict, where: str = "(dict)") -> HwConfig:
    _validate(data, where)
    quantizers = {name: QuantizerConfig(name, **spec) for name, spec in data["quantizers"].items()}

    def configs(op: str, kind: str, names: list[str]) -> tuple[QuantizerConfig, ...]:
        missing = [n for n in names if n not in quantizers]
        if missing:
            raise HardwareConfigError(f"hardware config {where} is invalid at ops/{op}/{kind}: unknown quantizer "
                                      f"{missing[0]!r}; defined: {', '.join(sorted(quantizers))}")
        return tuple(quantizers[n] for n in names)

    ops = {op: OpConfig(activations=configs(op, "activations", spec.get("activations", [])),
                        weights=configs(op, "weights", spec.get("weights", [])),
                        inputs=tuple(spec["inputs"]) if "inputs" in spec else None,
                        unified_scales=spec.get("unified_scales", False), propagate=spec.get("propagate", False),
                        quantized_output=spec.get("quantized_output", False))
           for op, spec in data["ops"].items()}
    return HwConfig(data["device"], ops, where)


def load_hw_config(hw: str | os.PathLike | HwConfig | dict) -> HwConfig:
    """A device name (CPU, GPU, NPU, ANY; any case), the path of a JSON file, a dict, or a HwConfig."""
    if isinstance(hw, HwConfig):
        return hw
    if isinstance(hw, dict):
        return parse_hw_config(hw)
    text = str(hw)
    if text.upper() in DEVICES and not Path(text).suffix:
        return _builtin(text.upper())
    path = Path(text)
    if path.suffix.lower() != ".json":
        raise HardwareConfigError(f"unknown device {text!r}: use one of {', '.join(DEVICES)} or the path of a "
                                  "hardware config .json file")
    data = read_json(path, HardwareConfigError, missing=f"hardware config file {text!r} does not exist",
                     what=f"hardware config {text!r}")
    return parse_hw_config(data, repr(text))


@lru_cache(maxsize=None)
def _builtin(device: str) -> HwConfig:
    path = HERE / f"{device.lower()}.json"
    return parse_hw_config(json.loads(path.read_text()), path.name)


NARROWING_KEYS = ("mode", "per_channel", "signed")


def narrowed(hw: str | os.PathLike | HwConfig | dict, *, weights: dict | None = None,
             activations: dict | None = None) -> HwConfig:
    """`hw` with each op's weight and activation quantizers narrowed to those that fit `weights` and
    `activations`, as an NNCF config's `compression.weights` asks: {"mode": "symmetric" | "asymmetric",
    "per_channel": bool, "signed": bool}, any of them.

        lowbit.quantize(model, data, target_device=narrowed("NPU", weights={"per_channel": False}))

    A HardwareConfigError names an unknown key, or an op none of whose quantizers fits."""
    hw = load_hw_config(hw)
    wanted = {"weights": weights or {}, "activations": activations or {}}
    for kind, spec in wanted.items():
        unknown = sorted(set(spec) - set(NARROWING_KEYS))
        if unknown:
            raise HardwareConfigError(f"{kind}: unknown key {unknown[0]!r}; narrow by {', '.join(NARROWING_KEYS)}")
    ops = {}
    for op, config in hw.ops.items():
        fields = {}
        for kind, spec in wanted.items():
            configs = getattr(config, kind)
            if not configs or not spec:
                continue
            fit = tuple(c for c in configs if ("mode" not in spec or c.mode == spec["mode"])
                        and ("per_channel" not in spec or c.per_channel == spec["per_channel"])
                        and ("signed" not in spec or c.signed in (None, spec["signed"])))
            if not fit:
                raise HardwareConfigError(f"device {hw.device} has no {kind[:-1]} quantizer for {op} with {spec}; "
                                          "its quantizers are " + ", ".join(f"{c.mode} {c.granularity}"
                                                                            for c in configs))
            fields[kind] = fit
        ops[op] = replace(config, **fields) if fields else config
    return replace(hw, ops=ops)
