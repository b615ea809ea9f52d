"""The options of a pipeline run, typed and checked once: what compile/quantize take, and what passes read
(`ctx.options.preset`, ...) instead of string keys."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import OptionError
from ..quant.bits import Bits
from ..quant.dataset import CALIBRATION_BATCH
from ..quant.stats import RANGE_ESTIMATORS
from ..quant.weight_mse import WEIGHT_RANGE_ESTIMATORS

PRESETS = ("performance", "mixed")
MODEL_TYPES = ("transformer",)
OVERFLOW_FIX = ("enable", "first_layer", "disable")
RANGE_LEARNING = ("range", "lsq")  # how a torch module's quantizers learn in QAT (backends/torch_fq.py)
FOLD_BN = ("eval", "train")  # fold BN before quantizing, or merge it while it trains (passes/fold_bn.py)
# what a per-tensor weight quantizer's one grid spans where a BatchNorm is folded into its layer: the folded
# weight W * s, as deployed on hardware with one scale per weight tensor, or the stored W before the BN's
# per-channel s (NNCF's per_channel=False on a torch model; deployed, each filter's grid is then scaled by s)
PER_TENSOR_WEIGHTS = ("folded", "unfolded")
DEFAULT_OVERFLOW_FIX = "first_layer"  # NNCF's default for 8-bit weights and activations, on every target device


@dataclass
class Options:
    """Every option a built-in pass reads. Constructing one checks the values (an OptionError names the bad
    one); `Options.of(dict)` also refuses keys it does not know."""

    preset: str | None = None  # None: "mixed" for transformers, else "performance" (as NNCF)
    model_type: str | None = None
    range_estimator: str = "mean_min_max"
    overflow_fix: str = DEFAULT_OVERFLOW_FIX
    progress: bool = True
    batch_size: int = CALIBRATION_BATCH
    smooth_quant_alpha: float | None = None
    bits: Any = None  # quant.bits.Bits (or its dict form): bits per weight / activation, per layer
    range_learning: str = "range"
    fold_bn: str = "eval"
    per_tensor_weights: str = "folded"
    weight_range_estimator: str = "auto"  # quant/weight_mse.py: "mse" for per-tensor grids below 8 bits

    def __post_init__(self):
        if self.range_estimator is None:
            self.range_estimator = "mean_min_max"
        for name, value, known in (("preset", self.preset, PRESETS), ("model_type", self.model_type, MODEL_TYPES),
                                   ("range_estimator", self.range_estimator, RANGE_ESTIMATORS),
                                   ("overflow_fix", self.overflow_fix, OVERFLOW_FIX),
                                   ("range_learning", self.range_learning, RANGE_LEARNING),
                                   ("fold_bn", self.fold_bn, FOLD_BN),
                                   ("per_tensor_weights", self.per_tensor_weights, PER_TENSOR_WEIGHTS),
                                   ("weight_range_estimator", self.weight_range_estimator, WEIGHT_RANGE_ESTIMATORS)):
            if not (value is None and name in ("preset", "model_type")) and value not in known:
                raise OptionError(f"unknown {name} {value!r}: use one of {', '.join(known)}"
                                  + (" or None" if name == "model_type" else ""))
        self.bits = Bits.of(self.bits)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise OptionError(f"batch_size must be a positive int, got {self.batch_size!r}")

    @property
    def effective_preset(self) -> str:
        return self.preset or ("mixed" if self.model_type == "transformer" else "performance")

    @classmethod
    def of(cls, value: Any) -> Options:
        """`value` as Options: Options itself, or a dict of option names."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise OptionError(f"options is a {type(value).__name__}: pass a lowbit.passes.Options or a dict")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise OptionError(f"unknown option {unknown[0]!r}: the options are {', '.join(sorted(known))}")
        return cls(**value)
