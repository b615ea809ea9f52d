"""Hardware configs: the built-in devices load and validate, `hw=` takes a name in any case or a user's JSON,
and every way a config can be wrong is a HardwareConfigError that names the field or file at fault."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from models import resnet18

import lowbit
from lowbit.compiler import graph_of
from lowbit.hw_configs import DEVICES, HERE, load_hw_config, narrowed, parse_hw_config
from lowbit.backends.torch_fq import FakeQuantize
from lowbit.passes import PassManager
from lowbit.quant.placement import place_quantizers

BUILTIN = ["CPU", "GPU", "NPU", "ANY", "CPU_ORT"]
SCHEMA = json.loads((HERE / "schema.json").read_text())


def _cpu_json() -> dict:
    return json.loads((HERE / "cpu.json").read_text())


CONV_ONLY = {
    "device": "ConvOnly",
    "description": "a user's accelerator that runs only convolutions in INT8",
    "quantizers": {
        "act": {"bits": 8, "mode": "symmetric", "granularity": "per_tensor"},
        "wgt": {"bits": 8, "mode": "symmetric", "granularity": "per_channel", "narrow_range": True, "signed": True},
    },
    "ops": {"Conv": {"activations": ["act"], "weights": ["wgt"], "inputs": [0]}},
}


class SmallResidual(torch.nn.Module):
    """conv -> relu -> (conv + residual add) -> relu -> pool -> linear: every op kind a config may list."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(y + self.c2(y))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def small_graph():
    torch.manual_seed(0)
    graph = lowbit.lower(SmallResidual().eval(), (torch.randn(2, 1, 8, 8),))
    return PassManager(["cleanup", "fold_bn", "fuse"]).run(graph)


@pytest.fixture(scope="module")
def resnet_graph():
    torch.manual_seed(0)
    graph = lowbit.lower(resnet18(num_classes=1000).eval(), (torch.randn(1, 3, 32, 32),))
    return PassManager(["cleanup", "fold_bn", "fuse"]).run(graph)


def _write(tmp_path: Path, data, name="my_device.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _consumer_ops(points) -> set[str]:
    return {node.op_type for p in points for node, _ in p.consumers}


# --------------------------------------------------------------------------- built-in devices


@pytest.mark.parametrize("device", BUILTIN)
def test_builtin_device_loads(device):
    hw = load_hw_config(device)
    assert hw.device == device
    conv = hw.op("Conv")
    assert conv is not None and conv.inputs == (0,)
    assert [c.name for c in conv.activations] == ["a8_sym", "a8_asym"]
    assert conv.weights[0].per_channel and conv.weights[0].symmetric and conv.weights[0].narrow_range
    assert conv.weights[0].signed is True and conv.weights[0].bits == 8
    assert hw.op("Concat").propagate and hw.op("Concat").unified_scales
    assert hw.op("Relu") is None  # ops absent from the table stay FP32
    assert (hw.op("MaxPool") is not None) == (device == "NPU")


def test_npu_differs_from_cpu_as_documented():
    cpu, npu = load_hw_config("CPU"), load_hw_config("NPU")
    assert not cpu.op("Add").unified_scales and not cpu.op("Mul").unified_scales
    assert npu.op("Add").unified_scales and npu.op("Mul").unified_scales
    assert cpu.op("MaxPool") is None and npu.op("MaxPool") is not None
    assert set(npu.ops) - set(cpu.ops) == {"MaxPool"}


def test_cpu_ort_differs_from_cpu_only_in_quantized_conv_outputs():
    cpu, ort = load_hw_config("CPU"), load_hw_config("CPU_ORT")
    assert set(ort.ops) == set(cpu.ops)
    differ = {op for op in cpu.ops if cpu.op(op) != ort.op(op)}
    assert differ == {"Conv", "ConvTranspose"}
    assert all(ort.op(op).quantized_output and not cpu.op(op).quantized_output for op in differ)
    others = [load_hw_config(device) for device in ("CPU", "GPU", "NPU", "ANY")]
    assert not any(spec.quantized_output for hw in others for spec in hw.ops.values())


def test_devices_constant_lists_the_builtins():
    assert tuple(DEVICES) == tuple(BUILTIN)
    assert sorted(p.stem.upper() for p in HERE.glob("*.json") if p.name != "schema.json") == sorted(BUILTIN)


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("device", BUILTIN)
def test_builtin_json_validates_against_schema_with_jsonschema(device):
    data = json.loads((HERE / f"{device.lower()}.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    assert data["device"] == device
    # every quantizer an op names is defined
    for op, spec in data["ops"].items():
        for name in spec.get("activations", []) + spec.get("weights", []):
            assert name in data["quantizers"], (op, name)


@pytest.mark.parametrize("spelling", ["cpu", "Cpu", "CPU", "gPu", "npu", "any"])
def test_device_name_in_any_case(spelling):
    assert load_hw_config(spelling).device == spelling.upper()
    assert load_hw_config(spelling) == load_hw_config(spelling.upper())


def test_load_accepts_dict_and_hwconfig():
    hw = load_hw_config(CONV_ONLY)
    assert hw.device == "ConvOnly" and set(hw.ops) == {"Conv"}
    assert load_hw_config(hw) is hw


# --------------------------------------------------------------------------- a user's JSON file


@pytest.mark.parametrize("as_path", [False, True])
def test_user_json_path_loads(tmp_path, as_path):
    path = _write(tmp_path, CONV_ONLY)
    hw = load_hw_config(path if as_path else str(path))
    assert hw.device == "ConvOnly"
    assert set(hw.ops) == {"Conv"}
    assert hw.op("Conv").weights[0].name == "wgt"


def test_user_json_changes_placement_to_conv_only(tmp_path, small_graph):
    cpu_points = place_quantizers(small_graph, load_hw_config("CPU"))
    user_points = place_quantizers(small_graph, load_hw_config(_write(tmp_path, CONV_ONLY)))
    # CPU: 3 weights (2 conv + fc), activations: x, relu (conv2 + add), conv2 out (add), relu_1 (pool), pool out (fc)
    assert sum(p.kind == "weight" for p in cpu_points) == 3
    assert sum(p.kind == "activation" for p in cpu_points) == 5
    assert {"Add", "GlobalAveragePool", "Gemm"} <= _consumer_ops(cpu_points)
    # Conv only: the two conv weights, and the two conv inputs; nothing else
    assert _consumer_ops(user_points) == {"Conv"}
    assert sum(p.kind == "weight" for p in user_points) == 2
    assert sum(p.kind == "activation" for p in user_points) == 2
    assert all(p.config.name in ("act", "wgt") for p in user_points)


def test_compile_with_user_json_inserts_only_conv_quantizers(tmp_path):
    torch.manual_seed(0)
    model = SmallResidual().eval()
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = lowbit.compile(model, ["cleanup", "fold_bn", "fuse", "quantize"], hw=str(_write(tmp_path, CONV_ONLY)),
                       dataset=lowbit.Dataset(data), progress=False)
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    assert len(fqs) == 4
    graph = graph_of(q)
    fq_nodes = [n for n in graph if n.op_type == "FakeQuantize"]
    assert len(fq_nodes) == 4
    assert {u.op_type for n in fq_nodes for u in n.output.users} == {"Conv"}
    # the user's weight config is narrow-range symmetric per channel: 255 levels, [-m, m]
    weight_fqs = [m for m in fqs if m.low.dim() == 4]
    assert len(weight_fqs) == 2
    for m in weight_fqs:
        assert m.levels == 255 and m.low.shape == (8, 1, 1, 1)
        assert torch.equal(m.low, -m.high)


def test_ops_absent_from_config_stay_fp32(tmp_path, resnet_graph):
    data = _cpu_json()
    del data["ops"]["Add"]
    no_add = load_hw_config(_write(tmp_path, data))
    full = place_quantizers(resnet_graph, load_hw_config("CPU"))
    points = place_quantizers(resnet_graph, no_add)
    assert "Add" in _consumer_ops(full)
    assert "Add" not in _consumer_ops(points)
    # 8 residual Adds: each loses the quantizer of its conv branch, the 3 downsampling ones also that of the shortcut
    assert sum(p.kind == "weight" for p in points) == 21
    assert sum(p.kind == "activation" for p in points) == 30 - 8 - 3
    for node in resnet_graph:
        if node.op_type == "Add":
            assert not any(node in [c for c, _ in p.consumers] for p in points), node.name


def test_compile_accepts_device_name_in_lower_case():
    torch.manual_seed(0)
    q = lowbit.compile(SmallResidual().eval(), ["cleanup", "fold_bn", "fuse", "quantize"], hw="npu",
                       dataset=lowbit.Dataset([torch.randn(2, 1, 8, 8)]), progress=False)
    assert sum(node.op_type == "FakeQuantize" for node in q.lowbit_graph) == 8
    assert sum(isinstance(m, FakeQuantize) for m in q.modules()) == 7  # the Add's two inputs share one (NPU)


def test_npu_add_inputs_share_one_range(small_graph):
    points = place_quantizers(small_graph, load_hw_config("NPU"))
    add = next(n for n in small_graph if n.op_type == "Add")
    feeding = [p for p in points if any(c is add for c, _ in p.consumers)]
    assert len(feeding) == 2
    assert feeding[0].group is not None and feeding[0].group == feeding[1].group
    cpu = [p for p in place_quantizers(small_graph, load_hw_config("CPU")) if any(c is add for c, _ in p.consumers)]
    assert [p.group for p in cpu] == [None, None]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["TPU", "cpu0", "", "vpu"])
def test_unknown_device_lists_known_devices(name):
    with pytest.raises(lowbit.HardwareConfigError) as info:
        load_hw_config(name)
    message = str(info.value)
    assert repr(name) in message
    for device in BUILTIN:
        assert device in message


def test_unknown_device_fails_in_compile_before_any_work():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the model must not be run or captured")

    with pytest.raises(lowbit.HardwareConfigError, match="CPU, GPU, NPU, ANY"):
        lowbit.compile(Boom(), hw="TPU", example_inputs=(torch.randn(1, 3),))
    with pytest.raises(lowbit.HardwareConfigError, match="CPU, GPU, NPU, ANY"):
        lowbit.quantize(Boom(), lowbit.Dataset([torch.randn(1, 3)]), target_device="TPU")


def _broken(mutate):
    data = _cpu_json()
    mutate(data)
    return data


SCHEMA_FAILURES = {
    "bits_string": (lambda d: d["quantizers"]["a8_sym"].update(bits="eight"), "quantizers/a8_sym/bits", "'eight'"),
    "bits_four": (lambda d: d["quantizers"]["a8_sym"].update(bits=4), "quantizers/a8_sym/bits", "4"),
    "mode_enum": (lambda d: d["quantizers"]["w8_sym_pc"].update(mode="symetric"), "quantizers/w8_sym_pc/mode",
                  "'symetric'"),
    "granularity_enum": (lambda d: d["quantizers"]["a8_asym"].update(granularity="per_row"),
                         "quantizers/a8_asym/granularity", "'per_row'"),
    "quantizer_unknown_property": (lambda d: d["quantizers"]["a8_sym"].update(bitz=8), "quantizers/a8_sym",
                                   "'bitz'"),
    "top_unknown_property": (lambda d: d.update(opz={}), "(top level)", "'opz'"),
    "missing_quantizers": (lambda d: d.pop("quantizers"), "(top level)", "'quantizers' is a required property"),
    "missing_device": (lambda d: d.pop("device"), "(top level)", "'device' is a required property"),
    "op_unknown_property": (lambda d: d["ops"]["Conv"].update(unified=True), "ops/Conv", "'unified'"),
    "negative_input": (lambda d: d["ops"]["Conv"].update(inputs=[-1]), "ops/Conv/inputs/0", "-1"),
    "narrow_range_type": (lambda d: d["quantizers"]["a8_sym"].update(narrow_range="no"),
                          "quantizers/a8_sym/narrow_range", "'no'"),
}


@pytest.mark.parametrize("case", list(SCHEMA_FAILURES))
def test_schema_failure_names_the_field(tmp_path, case):
    mutate, field_path, offending = SCHEMA_FAILURES[case]
    data = _broken(mutate)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(data)
    path = _write(tmp_path, data)
    with pytest.raises(lowbit.HardwareConfigError) as info:
        load_hw_config(path)
    message = str(info.value)
    assert f"invalid at {field_path}:" in message
    assert offending in message
    assert str(path) in message  # the file at fault
    with pytest.raises(lowbit.HardwareConfigError, match=re.escape(f"invalid at {field_path}:")):
        parse_hw_config(data)


def test_schema_failure_in_compile_names_the_field(tmp_path):
    path = _write(tmp_path, _broken(lambda d: d["quantizers"]["a8_sym"].update(bits="eight")))
    with pytest.raises(lowbit.HardwareConfigError, match="quantizers/a8_sym/bits"):
        lowbit.compile(SmallResidual().eval(), hw=str(path), example_inputs=(torch.randn(1, 1, 8, 8),))


@pytest.mark.parametrize("kind", ["activations", "weights"])
def test_op_naming_an_undefined_quantizer(tmp_path, kind):
    data = _cpu_json()
    data["ops"]["Conv"][kind] = ["a8_sym_typo"]
    # the schema cannot see this: it is a reference between two parts of the file
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    with pytest.raises(lowbit.HardwareConfigError) as info:
        load_hw_config(_write(tmp_path, data))
    message = str(info.value)
    assert f"ops/Conv/{kind}" in message
    assert "'a8_sym_typo'" in message
    assert "a8_sym" in message.split("defined:")[1]  # what is defined, so the user can fix the typo


def test_missing_file(tmp_path):
    missing = tmp_path / "nowhere" / "device.json"
    with pytest.raises(lowbit.HardwareConfigError) as info:
        load_hw_config(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "", '{"device": "X",}'])
def test_invalid_json(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(lowbit.HardwareConfigError) as info:
        load_hw_config(path)
    assert "not valid JSON" in str(info.value) and str(path) in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    with pytest.raises(lowbit.HardwareConfigError, match=r"\(top level\)"):
        load_hw_config(_write(tmp_path, "[1, 2, 3]"))


def test_errors_are_lowbit_errors():
    assert issubclass(lowbit.HardwareConfigError, lowbit.LowbitError)


def test_builtin_files_are_not_modified_by_loading():
    before = {p.name: p.read_bytes() for p in HERE.glob("*.json")}
    for device in BUILTIN:
        load_hw_config(device)
    data = copy.deepcopy(_cpu_json())
    parse_hw_config(data)
    assert data == _cpu_json()
    assert before == {p.name: p.read_bytes() for p in HERE.glob("*.json")}


def test_narrowed_keeps_only_the_quantizers_asked_for():
    cpu = load_hw_config("CPU")
    per_tensor = narrowed("CPU", weights={"per_channel": False})
    weighted = [op for op, spec in cpu.ops.items() if spec.weights]
    assert weighted and any(q.per_channel for op in weighted for q in cpu.ops[op].weights)
    for op in weighted:
        assert per_tensor.ops[op].weights == tuple(q for q in cpu.ops[op].weights if not q.per_channel)
        assert per_tensor.ops[op].activations == cpu.ops[op].activations
    assert narrowed("CPU") == cpu
    # and compile gives every weight one range with it (a per-channel one has a range per output channel)
    torch.manual_seed(0)
    model = SmallResidual().eval()
    data = lowbit.Dataset([torch.randn(4, 1, 8, 8) for _ in range(2)])
    ranges = {}
    for name, hw in (("per tensor", per_tensor), ("CPU", "CPU")):
        q = lowbit.compile(model, ["cleanup", "fold_bn", "fuse", "quantize"], hw=hw, dataset=data, progress=False)
        weight_fqs = [m for m in q.modules() if isinstance(m, FakeQuantize) and m.levels == 255]  # narrow range
        ranges[name] = [m.low.numel() for m in weight_fqs]
    assert ranges["per tensor"] == [1, 1, 1] and len(ranges["CPU"]) == 3 and min(ranges["CPU"]) > 1, ranges


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {"granularity": "per_tensor"}}, "weights: unknown key 'granularity'; narrow by mode, per_channel"),
    ({"weights": {"mode": "asymmetric", "per_channel": False}}, "device CPU has no weight quantizer for \\w+ with"),
])
def test_narrowed_names_what_cannot_be_met(kwargs, message):
    with pytest.raises(lowbit.HardwareConfigError, match=message):
        narrowed("CPU", **kwargs)
