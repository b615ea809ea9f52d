"""Accuracy-aware training with early exit (NNCF's `accuracy_aware_training` in "early_exit" mode): fine-tune a
compressed model only until it is back within a tolerated accuracy drop of the uncompressed model.

`accuracy_aware_training(controller, model, train_epoch_fn, validate_fn, ...)` validates the compressed model
first and returns it untouched when it already meets the target. Otherwise it runs the user's training epochs,
one `train_epoch_fn` and one `validate_fn` call each, and stops at the first epoch whose accuracy meets the
target, or after `maximal_total_epochs`. Only fully compressed epochs (by the controller's `compression_stage()`,
when it has one) count, the model as given among them: the best one's weights are loaded back at the end.

The target is `uncompressed * (1 - rel / 100)` for `maximal_relative_accuracy_degradation=rel` (a percentage)
or `uncompressed - abs` for `maximal_absolute_accuracy_degradation=abs` (in accuracy points); give exactly one.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import OptionError

_RELATIVE = "maximal_relative_accuracy_degradation"
_ABSOLUTE = "maximal_absolute_accuracy_degradation"
LOG_FILE = "accuracy_aware.json"


@dataclass(frozen=True)
class AccuracyAwareRunner:
    """Where the run stands after an epoch; what `dump_checkpoint_fn` is given (read-only)."""

    epoch: int
    accuracy: float
    best_accuracy: float | None  # None until a fully compressed epoch has been validated
    target_accuracy: float
    uncompressed_accuracy: float
    history: tuple[tuple[int, float], ...] = ()  # (epoch, accuracy) for every validation, epoch 0 first


def accuracy_aware_training(controller: Any, model: Any, train_epoch_fn: Callable, validate_fn: Callable, *,
                            uncompressed_accuracy: float,
                            maximal_relative_accuracy_degradation: float | None = None,
                            maximal_absolute_accuracy_degradation: float | None = None,
                            maximal_total_epochs: int,
                            configure_optimizers_fn: Callable | None = None,
                            dump_checkpoint_fn: Callable | None = None,
                            log_dir: str | os.PathLike | None = None) -> Any:
    """Train `model` epoch by epoch until its accuracy is within the tolerated degradation; return it.

    `train_epoch_fn(controller, model, epoch, optimizer, lr_scheduler)` trains one epoch; `validate_fn(model,
    epoch)` returns the accuracy (a finite number); `configure_optimizers_fn()` returns `(optimizer,
    lr_scheduler)`; `dump_checkpoint_fn(model, controller, runner, log_dir)` is called after each epoch. The
    model is changed in place: it ends holding the weights of the best fully compressed epoch.
    """
    _check_callables(train_epoch_fn=train_epoch_fn, validate_fn=validate_fn,
                     configure_optimizers_fn=configure_optimizers_fn, dump_checkpoint_fn=dump_checkpoint_fn)
    _check_model(model)
    uncompressed = _number(uncompressed_accuracy, "uncompressed_accuracy")
    target = target_accuracy(uncompressed, maximal_relative_accuracy_degradation,
                             maximal_absolute_accuracy_degradation)
    if isinstance(maximal_total_epochs, bool) or not isinstance(maximal_total_epochs, int) \
            or maximal_total_epochs < 1:
        raise OptionError(f"maximal_total_epochs={maximal_total_epochs!r} must be a positive int (the most "
                          "training epochs to run before giving up on the accuracy target)")
    optimizer, lr_scheduler = _optimizers(configure_optimizers_fn)

    accuracy = _validate(validate_fn, model, 0)
    history = [(0, accuracy)]
    best_epoch, best_accuracy, best_state = None, None, None
    if is_fully_compressed(controller):  # the model as given competes too: training may only make it worse
        if accuracy >= target:
            _write_log(log_dir, uncompressed, target, history, best_epoch=0, best_accuracy=accuracy)
            return model
        best_epoch, best_accuracy, best_state = 0, accuracy, _copy_state(model)
    for epoch in range(1, maximal_total_epochs + 1):
        train_epoch_fn(controller, model, epoch, optimizer, lr_scheduler)
        _scheduler_epoch_step(controller)
        accuracy = _validate(validate_fn, model, epoch)
        history.append((epoch, accuracy))
        counts = is_fully_compressed(controller)
        if counts and (best_accuracy is None or accuracy > best_accuracy):
            best_epoch, best_accuracy, best_state = epoch, accuracy, _copy_state(model)
        if dump_checkpoint_fn is not None:
            runner = AccuracyAwareRunner(epoch, accuracy, best_accuracy, target, uncompressed, tuple(history))
            dump_checkpoint_fn(model, controller, runner, log_dir)
        if counts and accuracy >= target:
            break
    else:
        _warn_target_missed(best_accuracy, target, maximal_total_epochs)

    if best_state is not None:
        model.load_state_dict(best_state)
    _write_log(log_dir, uncompressed, target, history, best_epoch, best_accuracy)
    return model


def target_accuracy(uncompressed: float, relative: float | None, absolute: float | None) -> float:
    """The accuracy to reach: `uncompressed` less the one degradation bound given."""
    if (relative is None) == (absolute is None):
        given = "both were given" if relative is not None else "neither was given"
        raise OptionError(f"give exactly one of {_RELATIVE} (a percentage of uncompressed_accuracy, 1.0 = 1%) "
                          f"and {_ABSOLUTE} (in accuracy points): {given}")
    name, bound = (_RELATIVE, relative) if relative is not None else (_ABSOLUTE, absolute)
    bound = _number(bound, name)
    if bound < 0:
        raise OptionError(f"{name}={bound!r} must not be negative (it is the accuracy drop tolerated)")
    return uncompressed * (1 - bound / 100) if name == _RELATIVE else uncompressed - bound


def is_fully_compressed(controller: Any) -> bool:
    """Whether the controller's `compression_stage()` says fully compressed; True when it has none."""
    stage_fn = getattr(controller, "compression_stage", None)
    if not callable(stage_fn):
        return True
    stage = stage_fn()
    stage = str(getattr(stage, "name", stage))  # an enum (lowbit's and NNCF's CompressionStage), or a string
    return "FULLY" in stage.upper()


def _check_callables(**fns: Callable | None) -> None:
    for name, fn in fns.items():
        required = name in ("train_epoch_fn", "validate_fn")
        if (fn is not None or required) and not callable(fn):
            raise OptionError(f"{name} must be a function, not a {type(fn).__name__}")


def _check_model(model: Any) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"accuracy_aware_training trains a torch module: model is a {type(model).__name__}")


def _finite(value: Any) -> float | None:
    """`value` as a finite float (a one-element tensor or array counts), or None."""
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _number(value: Any, name: str) -> float:
    number = _finite(value)
    if number is None:
        raise OptionError(f"{name} must be a finite number, not {value!r}")
    return number


def _validate(validate_fn: Callable, model: Any, epoch: int) -> float:
    result = validate_fn(model, epoch)
    accuracy = _finite(result)
    if accuracy is None:
        raise OptionError(f"validate_fn returned {result!r} for epoch {epoch}: it must return the model's "
                          "accuracy as a finite number")
    return accuracy


def _optimizers(configure_optimizers_fn: Callable | None) -> tuple[Any, Any]:
    if configure_optimizers_fn is None:
        return None, None
    result = configure_optimizers_fn()
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise OptionError(f"configure_optimizers_fn returned {result!r}: it must return a pair "
                          "(optimizer, lr_scheduler), either of which may be None")
    return result[0], result[1]


def _scheduler_epoch_step(controller: Any) -> None:
    epoch_step = getattr(getattr(controller, "scheduler", None), "epoch_step", None)
    if callable(epoch_step):
        epoch_step()


def _copy_state(model: Any) -> dict:
    import copy

    import torch

    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
            for k, v in model.state_dict().items()}


def _warn_target_missed(best_accuracy: float | None, target: float, maximal_total_epochs: int) -> None:
    best = "no fully compressed epoch" if best_accuracy is None else f"best accuracy {best_accuracy:g}"
    warnings.warn(f"accuracy-aware training did not reach the target accuracy {target:g}: {best} after "
                  f"maximal_total_epochs={maximal_total_epochs} was reached", stacklevel=3)


def _write_log(log_dir: Any, uncompressed: float, target: float, history: list, best_epoch: int | None,
               best_accuracy: float | None) -> None:
    if log_dir is None:
        return
    os.makedirs(log_dir, exist_ok=True)
    record = {"uncompressed_accuracy": uncompressed, "target_accuracy": target,
              "history": [[epoch, accuracy] for epoch, accuracy in history],
              "best_epoch": best_epoch, "best_accuracy": best_accuracy,
              "target_reached": best_accuracy is not None and best_accuracy >= target}
    with open(os.path.join(log_dir, LOG_FILE), "w") as f:
        json.dump(record, f, indent=2)
