"""Every error a user of lowbit can cause.

Each class names one kind of mistake; each message says what is wrong (the
file, node or field at fault) and what to do about it. Catch `LowbitError` to
catch them all.
"""


class LowbitError(Exception):
    """Base class of every error lowbit raises for a user's input."""


class ModelLoadError(LowbitError):
    """A model file is missing, unreadable or not a valid model."""


class CaptureError(LowbitError):
    """torch.export could not capture a torch model."""


class MissingExampleInputsError(LowbitError):
    """An nn.Module was given without the example inputs needed to capture it."""


class UnsupportedModelError(LowbitError):
    """The object given is not a kind of model lowbit takes."""


class UnknownTargetError(LowbitError):
    """codegen/export was asked for a target lowbit cannot write."""


class UnsupportedOpError(LowbitError):
    """A node cannot be emitted to the requested backend (e.g. an opaque torch op into ONNX)."""


class GraphError(LowbitError):
    """A graph is malformed: broken use-def chains, order, names or types."""


class TextParseError(LowbitError):
    """The text form of a graph could not be parsed."""


class RuleLoopError(LowbitError):
    """A rewrite rule set never reached a fixed point (a rule keeps undoing or redoing its work)."""


class UnknownPassError(LowbitError):
    """A pass was named that is not registered."""


class PassError(LowbitError):
    """A pass failed or left the graph invalid."""


class DumpError(LowbitError):
    """The dump directory cannot be written."""


class OutputPathError(LowbitError):
    """An output path (export, the command line's -o) has the wrong suffix or cannot be written."""


class HardwareConfigError(LowbitError):
    """An unknown device, or a hardware config file that fails its schema."""


class DatasetError(LowbitError):
    """The calibration dataset is empty, or an item does not fit the model."""


class AlreadyQuantizedError(LowbitError):
    """A model that already holds quantizers (QDQ, FakeQuantize) was given to be quantized again."""


class CalibrationDataError(DatasetError):
    """Calibration data read from files (the command line's --data) is missing or does not fit the model."""


class IgnoredScopeError(LowbitError):
    """An ignored-scope entry matches nothing in the model."""


class OptionError(LowbitError, ValueError):
    """An option of compile/quantize or of a pass has a value lowbit does not know."""


class ConfigError(OptionError):
    """A training-time compression config (NNCF's JSON form, or NNI's config_list) has an unknown or ill-typed
    field; the message names its JSON path."""


class StateError(LowbitError):
    """A compression-state file cannot be read, is of an unknown version, or belongs to another model."""


class InputShapeError(LowbitError, ValueError):
    """A lowbit-generated module was called with an input size its model was not captured for."""


class PruneError(LowbitError, ValueError):
    """A pruning request lowbit cannot carry out: a ratio out of range, an unknown criterion, a config_list entry
    that matches no layer, an already quantized model."""
