"""Training-time compression configs: NNCF's JSON format (the fields lowbit implements) and NNI's quantization
`config_list`, read into one typed `CompressionConfig`.

The JSON is validated against `nncf_config.schema.json`, which ships with lowbit: an unknown or ill-typed field
is a ConfigError naming its JSON path (`compression[0].weights.bits`). NNI's form, a list of
`{"quant_types": [...], "quant_bits": ..., "op_types": [...], "op_names": [...], "exclude": bool}`, becomes the
same quantization settings: bits per weight (`weight`) and activation (`input`; `output` is the next layer's
input), per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..json_file import read_json

HERE = Path(__file__).parent
DEVICES = {"ANY": "ANY", "CPU": "CPU", "GPU": "GPU", "NPU": "NPU", "CPU_SPR": "CPU", "TRIAL": "ANY"}
RANGE_TYPES = {"min_max": "min_max", "mean_min_max": "mean_min_max", "percentile": "percentile"}
OVERFLOW_FIX = {"enable": "enable", "disable": "disable", "first_layer_only": "first_layer",
                "first_layer": "first_layer"}
SCHEDULES = {"exponential": "agp", "agp": "agp", "baseline": "linear", "linear": "linear"}
CRITERIA = {"L1": "l1", "L2": "l2", "l1": "l1", "l2": "l2", "geometric_median": "geometric_median"}
TORCH_TYPES = {"float": "float32", "float32": "float32", "long": "int64", "int64": "int64", "int32": "int32",
               "bool": "bool"}


@lru_cache(maxsize=None)
def schema() -> dict:
    return json.loads((HERE / "nncf_config.schema.json").read_text())


@dataclass(frozen=True)
class InputInfo:
    sample_size: tuple[int, ...]
    dtype: str = "float32"
    filler: str = "random"


@dataclass(frozen=True)
class Quantization:
    preset: str | None = None
    weights: dict = field(default_factory=dict)  # mode, bits, per_channel, signed
    activations: dict = field(default_factory=dict)
    num_init_samples: int = 256
    range_type: str = "mean_min_max"
    num_bn_adaptation_samples: int = 2000
    overflow_fix: str = "first_layer"
    ignored_scopes: tuple[str, ...] = ()
    bits: dict | None = None  # quant.bits.Bits's dict form
    range_learning: str = "range"
    fold_bn: str = "eval"
    per_tensor_weights: str = "folded"
    weight_range_estimator: str = "auto"


@dataclass(frozen=True)
class FilterPruning:
    pruning_init: float = 0.0
    pruning_target: float = 0.5
    pruning_steps: int = 10
    schedule: str = "agp"
    criterion: str = "l2"
    ignored_scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompressionConfig:
    algorithms: tuple[Quantization | FilterPruning, ...]  # at most one of each
    target_device: str = "ANY"
    input_info: tuple[InputInfo, ...] = ()
    log_dir: str | None = None
    raw: dict = field(default_factory=dict)  # the config as given (a dict), what the compression state records

    def algorithm(self, kind: type):
        """The algorithm of class `kind` (Quantization or FilterPruning) in this config, or None."""
        return next((a for a in self.algorithms if isinstance(a, kind)), None)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _json_path(parts) -> str:
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "(top level)"


def _validate(config: dict, was_list: dict[str, bool]) -> None:
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(schema()).iter_errors(config),
                    key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))), reverse=True)
    if errors:
        e = errors[0]
        parts = list(e.absolute_path)
        if len(parts) >= 2 and parts[0] in was_list and not was_list[parts[0]]:
            del parts[1]  # compression given as one dict, not a list: name it as the user wrote it
        raise ConfigError(f"config field {_json_path(parts)}: {e.message}")


def read_config(config: Any) -> CompressionConfig:
    """An NNCF-style config (a dict, or the path of a .json file) as a CompressionConfig; NNI's quantization
    config_list (a list of dicts with quant_types) too."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        config = read_json(path, ConfigError, what=f"compression config {str(path)!r}",
                           missing=f"no compression config at {str(path)!r}: pass a dict or the path of a .json file")
    if isinstance(config, list):
        return from_nni(config)
    if not isinstance(config, dict):
        raise ConfigError(f"the compression config is a {type(config).__name__}: pass a dict (NNCF's form), a "
                          "list (NNI's config_list) or the path of a .json file")
    was_list = {k: isinstance(config.get(k), list) for k in ("compression", "input_info")}
    normalized = {**config, **{k: _as_list(config[k]) for k in was_list if k in config}}
    _validate(normalized, was_list)
    algorithms = []
    for i, algo in enumerate(normalized["compression"]):
        algorithms.append(_quantization(algo) if algo["algorithm"] == "quantization" else _pruning(algo))
    kinds = [type(a).__name__ for a in algorithms]
    if len(set(kinds)) < len(kinds):
        raise ConfigError("config field compression: each algorithm may appear once (quantization, "
                          "filter_pruning)")
    inputs = tuple(InputInfo(tuple(i["sample_size"]), TORCH_TYPES[i.get("type", "float")], i.get("filler", "random"))
                   for i in normalized.get("input_info", []))
    for i, info in enumerate(normalized.get("input_info", [])):
        if "keyword" in info:
            where = f"input_info[{i}]" if was_list["input_info"] else "input_info"
            raise ConfigError(f"config field {where}.keyword: lowbit passes inputs by position; leave "
                              "keyword out and list input_info in forward()'s argument order")
    return CompressionConfig(tuple(algorithms), DEVICES[normalized.get("target_device", "ANY")], inputs,
                             normalized.get("log_dir"), raw=config)


def _scopes(value: Any) -> tuple[str, ...]:
    return tuple(_as_list(value)) if value is not None else ()


def _quantization(algo: dict) -> Quantization:
    weights, activations = dict(algo.get("weights", {})), dict(algo.get("activations", {}))
    init = algo.get("initializer", {})
    overrides = algo.get("scope_overrides", {})
    layers: dict[str, dict] = {}
    for kind in ("weights", "activations"):
        for scope, spec in overrides.get(kind, {}).items():
            if "bits" in spec:
                layers.setdefault(scope, {})[kind] = spec["bits"]
    bits = {k: v["bits"] for k, v in (("weights", weights), ("activations", activations)) if "bits" in v}
    if layers:
        bits["layers"] = layers
    return Quantization(
        preset=algo.get("preset"), weights=weights, activations=activations,
        num_init_samples=init.get("range", {}).get("num_init_samples", 256),
        range_type=RANGE_TYPES[init.get("range", {}).get("type", "mean_min_max")],
        num_bn_adaptation_samples=init.get("batchnorm_adaptation", {}).get("num_bn_adaptation_samples", 2000),
        overflow_fix=OVERFLOW_FIX[algo.get("overflow_fix", "first_layer_only")],
        ignored_scopes=_scopes(algo.get("ignored_scopes")) + _scopes(weights.pop("ignored_scopes", None))
        + _scopes(activations.pop("ignored_scopes", None)),
        bits=bits or None, range_learning=algo.get("range_learning", "range"), fold_bn=algo.get("fold_bn", "eval"),
        per_tensor_weights=algo.get("per_tensor_weights", "folded"),
        weight_range_estimator=algo.get("weight_range_estimator", "auto"))


def _pruning(algo: dict) -> FilterPruning:
    params = algo.get("params", {})
    init = float(algo.get("pruning_init", 0.0))
    target = float(params.get("pruning_target", 0.5))
    if init > target:
        raise ConfigError(f"config field compression.pruning_init: {init} is above params.pruning_target {target}; "
                          "pruning only grows")
    return FilterPruning(pruning_init=init, pruning_target=target, pruning_steps=params.get("pruning_steps", 10),
                         schedule=SCHEDULES[params.get("schedule", "exponential")],
                         criterion=CRITERIA[params.get("weight_importance", "L2")],
                         ignored_scopes=_scopes(algo.get("ignored_scopes")))


NNI_KEYS = {"quant_types", "quant_bits", "op_types", "op_names", "exclude"}
NNI_KINDS = {"weight": "weights", "input": "activations", "output": "activations"}


def from_nni(config_list: list) -> CompressionConfig:
    """NNI's quantization config_list as a CompressionConfig: bits per layer from `quant_bits` (an int, or a dict
    by quant type), the layers by `op_names` (node names or module paths) and `op_types` (torch module class
    names or IR op types); `exclude` leaves layers in FP32. Later entries override earlier ones."""
    layers: dict[str, dict] = {}
    excluded: list[str] = []
    for i, entry in enumerate(config_list):
        if not isinstance(entry, dict):
            raise ConfigError(f"config_list[{i}] is a {type(entry).__name__}, not a dict such as "
                              "{'quant_types': ['weight', 'input'], 'quant_bits': 8, 'op_types': ['Conv2d']}")
        unknown = sorted(set(entry) - NNI_KEYS)
        if unknown:
            raise ConfigError(f"config_list[{i}].{unknown[0]}: unknown key; the keys are {', '.join(sorted(NNI_KEYS))}")
        if "op_types" not in entry and "op_names" not in entry:
            raise ConfigError(f"config_list[{i}]: give op_types or op_names (which layers it is for)")
        scopes = [f"{{type}}{t}" for t in entry.get("op_types", [])] + list(entry.get("op_names", []))
        if entry.get("exclude"):
            excluded += scopes
            continue
        types = entry.get("quant_types", ["weight", "input"])
        bad = [t for t in types if t not in NNI_KINDS]
        if bad:
            raise ConfigError(f"config_list[{i}].quant_types: unknown {bad[0]!r}; use weight, input or output")
        raw_bits = entry.get("quant_bits", 8)
        for t in types:
            b = raw_bits.get(t, 8) if isinstance(raw_bits, dict) else raw_bits
            if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8:
                raise ConfigError(f"config_list[{i}].quant_bits: {b!r} for {t!r}; bits are an int from 2 to 8")
            for scope in scopes:
                layers.setdefault(scope, {})[NNI_KINDS[t]] = b
    quantization = Quantization(bits={"layers": layers} if layers else None, ignored_scopes=tuple(excluded))
    return CompressionConfig((quantization,), raw={"config_list": config_list})
