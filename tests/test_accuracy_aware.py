"""lowbit.train.accuracy_aware_training: training stops at the first epoch within the accuracy target, the best
fully compressed epoch's weights end in the model, and every bad argument is an OptionError naming it."""

import json
import math
import warnings

import pytest
import torch

from lowbit.errors import OptionError
from lowbit.train import accuracy_aware_training


class Controller:
    def __init__(self, stages=None):
        self.stages, self.steps = stages, 0
        self.scheduler = self

    def epoch_step(self):
        self.steps += 1

    def compression_stage(self):  # stages[i] is the stage after i epoch_steps
        return self.stages[min(self.steps, len(self.stages) - 1)] if self.stages else "FULLY_COMPRESSED"


def _run(accuracies, controller=None, **options):
    """Train a Linear whose weight becomes the epoch number; validate_fn returns `accuracies` in turn."""
    model, calls, scripted = torch.nn.Linear(2, 1), [], iter(accuracies)

    def train_epoch(ctrl, m, epoch, optimizer, lr_scheduler):
        calls.append((epoch, optimizer, lr_scheduler))
        with torch.no_grad():
            m.weight.fill_(epoch)

    options = {"uncompressed_accuracy": 80.0, "maximal_absolute_accuracy_degradation": 1.0,
               "maximal_total_epochs": 5, **options}
    result = accuracy_aware_training(controller or Controller(), model, train_epoch,
                                     lambda m, epoch: next(scripted), **options)
    assert result is model
    return model, calls


def test_stops_at_the_first_epoch_within_the_target():
    controller = Controller()
    model, calls = _run([70, 75, 78, 79.5, 60, 60], controller)
    assert [c[0] for c in calls] == [1, 2, 3] and controller.steps == 3
    assert torch.all(model.weight == 3)


def test_returns_at_once_when_already_within_the_target():
    controller = Controller()
    _, calls = _run([79.0], controller, maximal_total_epochs=3)  # 79 == 80 - 1: the boundary counts
    assert calls == [] and controller.steps == 0


@pytest.mark.parametrize("bound, first_hit", [({"maximal_relative_accuracy_degradation": 10.0}, 2),
                                              ({"maximal_absolute_accuracy_degradation": 3.0}, 3)])
def test_relative_and_absolute_targets_stop_on_the_boundary(bound, first_hit):
    # uncompressed 80: relative 10% -> 72 exactly, absolute 3 -> 77 exactly
    options = {"maximal_absolute_accuracy_degradation": None, **bound}
    _, calls = _run([50, 71.9, 72.0, 77.0, 77.0], **options)
    assert len(calls) == first_hit


def test_best_fully_compressed_epoch_is_restored_and_a_warning_names_it():
    controller = Controller(["partially_compressed", "partially_compressed", "FULLY_COMPRESSED"])
    with pytest.warns(UserWarning, match=r"target accuracy 79\b.*best accuracy 77\b.*maximal_total_epochs=5"):
        # epoch 1 (78) is only partially compressed, so it does not count; epoch 3 (77) is the best that does
        model, calls = _run([50, 78, 70, 77, 76, 75], controller)
    assert len(calls) == 5 and controller.steps == 5
    assert torch.all(model.weight == 3)


def test_a_controller_without_stage_or_scheduler_counts_every_epoch():
    with pytest.warns(UserWarning, match="best accuracy 78"):
        model, _ = _run([50, 60, 78, 70], object(), maximal_total_epochs=3)
    assert torch.all(model.weight == 2)


def test_the_model_as_given_comes_back_when_training_only_makes_it_worse():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()

    def train_epoch(ctrl, m, epoch, optimizer, lr_scheduler):
        with torch.no_grad():
            m.weight.fill_(epoch)

    scripted = iter([75.0, 70.0, 72.0])
    with pytest.warns(UserWarning, match="best accuracy 75"):
        accuracy_aware_training(Controller(), model, train_epoch, lambda m, e: next(scripted),
                                uncompressed_accuracy=80.0, maximal_absolute_accuracy_degradation=1.0,
                                maximal_total_epochs=2)
    assert torch.equal(model.weight, before)


def test_optimizers_reach_train_epoch_and_checkpoints_get_the_runner(tmp_path):
    optimizer, scheduler, dumps = object(), object(), []

    def dump(model, controller, runner, log_dir):
        dumps.append((runner.epoch, runner.accuracy, runner.best_accuracy, runner.target_accuracy, log_dir))
        with pytest.raises(AttributeError):
            runner.epoch = 9

    _, calls = _run([70, 75, 79.5], configure_optimizers_fn=lambda: (optimizer, scheduler),
                    dump_checkpoint_fn=dump, log_dir=str(tmp_path))
    assert calls == [(1, optimizer, scheduler), (2, optimizer, scheduler)]
    assert dumps == [(1, 75.0, 75.0, 79.0, str(tmp_path)), (2, 79.5, 79.5, 79.0, str(tmp_path))]
    record = json.loads((tmp_path / "accuracy_aware.json").read_text())
    assert record["history"] == [[0, 70.0], [1, 75.0], [2, 79.5]]
    assert record["best_epoch"] == 2 and record["target_accuracy"] == 79.0 and record["target_reached"]


def test_no_optimizers_means_none():
    _, calls = _run([70, 80])
    assert calls == [(1, None, None)]


@pytest.mark.parametrize("options, named", [
    ({"maximal_relative_accuracy_degradation": 1.0}, "maximal_relative_accuracy_degradation"),
    ({"maximal_absolute_accuracy_degradation": None}, "maximal_absolute_accuracy_degradation"),
    ({"maximal_absolute_accuracy_degradation": -1.0}, "maximal_absolute_accuracy_degradation"),
    ({"maximal_total_epochs": 0}, "maximal_total_epochs"),
    ({"maximal_total_epochs": 2.5}, "maximal_total_epochs"),
    ({"uncompressed_accuracy": "80"}, "uncompressed_accuracy"),
    ({"configure_optimizers_fn": 3}, "configure_optimizers_fn"),
])
def test_bad_options_are_option_errors_naming_the_argument(options, named):
    with pytest.raises(OptionError, match=named):
        _run([70, 80], **options)


@pytest.mark.parametrize("bad", [None, math.nan, "high"])
def test_validate_fn_must_return_a_finite_number(bad):
    with pytest.raises(OptionError, match=r"validate_fn returned"):
        _run([70, bad])


def test_non_callable_train_epoch_fn_is_named():
    with pytest.raises(OptionError, match="train_epoch_fn"), warnings.catch_warnings():
        accuracy_aware_training(None, torch.nn.Linear(2, 1), None, lambda m, e: 1.0, uncompressed_accuracy=1.0,
                                maximal_absolute_accuracy_degradation=0.1, maximal_total_epochs=1)
