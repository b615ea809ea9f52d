"""OpenVINO latency of transformers at deployment sizes, lowbit side by side with NNCF in one run, with and without
lowbit's OpenVINO projection rewrites (lowbit/backends/openvino_projections.py).

bench/deploy.py times the digits ViT at 8x8 (0.1-0.3 ms), where per-node overheads dominate. Here two layouts of
attention at the sizes people deploy, random weights (latency does not depend on them):
- "vit_s": tests/models.py's TinyViT at ViT-S/16's width (224x224 RGB, patch 16, dim 384, 6 heads, MLP x4),
  4 blocks: one query/key/value Linear cut by reshape, permute and qkv[0..2] (timm's layout);
- "bert": transformers' BertModel (hidden 768, 12 heads, 4 layers) at 128 tokens: separate query, key and value
  Linears, each viewed into heads and transposed (HuggingFace's layout);
- "gpt2": transformers' GPT2Model (hidden 768, 12 heads, 4 layers) at 128 tokens: Conv1D, which views the
  tokens as rows for one addmm and the result back; q, k and v from one such addmm, split;
- "llama": transformers' LlamaModel at SmolLM-135M's width (hidden 576, 9 query heads sharing 3 key/value heads,
  MLP 1536), 4 layers, 128 tokens: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Both origins: the torch module, and its FP32 ONNX model (torch.onnx.export, dynamo=False; GPT-2's and Llama's,
which that exporter refuses (an op of their masks), with torch's default exporter, dynamic batch). Both tools with
their defaults and model_type transformer, 16 calibration inputs (random tokens or images); lowbit writes the
.xml with `lowbit.export`, NNCF as bench/deploy.py does (openvino.convert_model of its module; of its QDQ
model for the ONNX origin); where that fails, the row says why. "lowbit unsplit" is the same lowbit model written
with the projection rewrites switched off (what placement alone gives: from torch it already puts BERT's query
and key quantizers on their projections).

Measured by bench/ov_latency.py (OpenVINO's default CPU config; batch 1) in fresh processes, interleaved
rounds, as bench/deploy.py; ratios are medians of the per-round ratios, with their quartiles; "same exec graph"
says whether the rewrites changed what OpenVINO's CPU plugin runs at all. "lone FQ" counts
the FakeQuantize layers the CPU plugin runs alone on a FullyConnected's output carried through Reshape,
Transpose, Gather or Split (tests/deploy_checks.py), each with two layout Reorders around it.

    python bench/attention_latency.py [--rounds N] [--processes N] [--models vit_s bert gpt2 llama] [--no-nncf]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import deploy  # noqa: E402  (puts examples/ and tests/ on sys.path)
import ptq  # noqa: E402
import lowbit  # noqa: E402
from deploy_checks import default_exported, lone_quantizers_after_projections  # noqa: E402
from lowbit.backends import openvino_projections  # noqa: E402
from models import TinyViT  # noqa: E402

RESULTS = HERE / "results" / "attention_latency.md"
N_CALIB = 16
ORIGINS = ("torch", "onnx")
MODELS = ("vit_s", "bert", "gpt2", "llama")


def build(name: str):
    """(module, make_input(seed) -> batch-1 tensor)."""
    torch.manual_seed(0)
    if name == "vit_s":
        module = TinyViT(num_classes=1000, image_size=224, patch_size=16, in_ch=3, dim=384, depth=4, heads=6,
                         mlp_ratio=4).eval()
        return module, lambda seed: torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    import transformers
    from zoo_models import LastHiddenState

    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=4)
        module = LastHiddenState(transformers.GPT2Model(config).eval(), True).eval()
    elif name == "llama":
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=2048)
        module = LastHiddenState(transformers.LlamaModel(config).eval(), True).eval()
    else:
        config = transformers.BertConfig(num_hidden_layers=4)
        module = LastHiddenState(transformers.BertModel(config).eval(), True).eval()
    return module, lambda seed: torch.randint(0, config.vocab_size, (1, 128),
                                              generator=torch.Generator().manual_seed(seed))


def fp32_onnx(module, example: torch.Tensor, path: Path) -> onnx.ModelProto:
    try:
        torch.onnx.export(copy.deepcopy(module), (example,), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    except torch.onnx.errors.UnsupportedOperatorError:  # GPT-2's mask: torch's default exporter
        return default_exported(module, torch.cat([example, example]), path)
    return onnx.load(path)


def lowbit_files(source, items, stem: Path) -> dict[str, Path]:
    """lowbit's .xml, and the same model written without the projection rewrites."""
    q = lowbit.quantize(source, lowbit.Dataset(items), model_type="transformer")
    paths = {"lowbit": lowbit.export(q, f"{stem}_lowbit.xml")}
    rewrite = openvino_projections.projections_for_openvino
    openvino_projections.projections_for_openvino = lambda graph: graph
    try:
        paths["lowbit unsplit"] = lowbit.export(q, f"{stem}_lowbit_unsplit.xml")
    finally:
        openvino_projections.projections_for_openvino = rewrite
    return paths


def nncf_file(origin: str, source, items, example, stem: Path) -> Path:
    import nncf
    import openvino as ov

    if origin == "onnx":
        data = nncf.Dataset([{"x": x.numpy()} for x in items])
        q = nncf.quantize(source, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        onnx.save(q, f"{stem}_nncf.onnx")  # openvino.convert_model reads a file, not a ModelProto
        model = ov.convert_model(f"{stem}_nncf.onnx")
    else:
        q = nncf.quantize(copy.deepcopy(source), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(items))
        model = ov.convert_model(q, example_input=example)
    path = Path(f"{stem}_nncf.xml")
    ov.save_model(model, str(path))
    return path


def model_rows(name: str, tools: list[str], rounds: int, processes: int, workdir: Path, console) -> list[dict]:
    module, make_input = build(name)
    items = [make_input(i) for i in range(N_CALIB)]
    example = make_input(N_CALIB)
    np.save(workdir / f"{name}_input.npy", example.numpy())
    rows = []
    for origin in ORIGINS:
        console.log(f"{name} from {origin}: quantizing")
        stem = workdir / f"{name}_{origin}"
        source = module if origin == "torch" else fp32_onnx(module, example, workdir / f"{name}_fp32.onnx")
        data = items if origin == "torch" else [x.numpy() for x in items]
        paths = lowbit_files(copy.deepcopy(source) if origin == "torch" else source, data, stem)
        failed = {}
        if "nncf" in tools:
            try:
                paths["nncf"] = nncf_file(origin, source, items, example, stem)
            except Exception as e:  # the reason goes in the table
                failed["nncf"] = str(ptq.Failed(e))
        console.log(f"{name} from {origin}: latency")
        measured = deploy.run_latency(paths, "OpenVINO", workdir / f"{name}_input.npy", rounds, processes)
        row = {"model": name, "origin": origin, "failed": failed}
        for who, path in paths.items():
            row[f"{who}_ms"] = 1000 * float(np.median(sum(measured[who]["seconds"], [])))
            row[f"{who}_rounds"] = measured[who]["seconds"]
            row[f"{who}_lone"] = len(lone_quantizers_after_projections(path))
            row[f"{who}_graph"] = measured[who]["exec_graph"]
        rows.append(row)
    return rows


def _ratio(row: dict, a: str, b: str) -> str:
    if f"{a}_rounds" not in row or f"{b}_rounds" not in row:
        return "-"
    ratios = [np.median(p) / np.median(q) for p, q in zip(row[f"{a}_rounds"], row[f"{b}_rounds"])]
    low, high = np.percentile(ratios, [25, 75])
    return f"{np.median(ratios):.3f} ({low:.3f}-{high:.3f})"


def table(rows: list[dict], tools: list[str]) -> tuple:
    whos = ["lowbit", "lowbit unsplit"] + (["nncf"] if "nncf" in tools else [])
    head = ["model", "origin", *[f"{w} ms" for w in whos], *[f"{w} lone FQ" for w in whos],
            "lowbit / lowbit unsplit (IQR)", "same exec graph"] + (["lowbit/NNCF (IQR)", "lowbit unsplit/NNCF (IQR)"]
                                                 if "nncf" in tools else [])
    body, notes = [], []
    for r in rows:
        missing = {w: deploy._note(notes, f"{w}, {r['model']} from {r['origin']}: {why}")
                   for w, why in r["failed"].items()}
        cells = [r["model"], r["origin"], *[f"{r[f'{w}_ms']:.2f}" if w not in missing else f"- {missing[w]}"
                                            for w in whos],
                 *[str(r[f"{w}_lone"]) if w not in missing else "-" for w in whos],
                 _ratio(r, "lowbit", "lowbit unsplit"),
                 "yes" if r["lowbit_graph"] == r["lowbit unsplit_graph"] else "no"]
        if "nncf" in tools:
            cells += [_ratio(r, "lowbit", "nncf"), _ratio(r, "lowbit unsplit", "nncf")]
        body.append(cells)
    title = ("OpenVINO latency, batch 1, default CPU config: median ms of interleaved rounds in fresh processes; "
             "ratios: median of the per-round ratios (quartiles)")
    return title, head, body, notes


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF columns")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console(width=200)
    warnings.filterwarnings("ignore")
    tools = deploy.compared_tools(console, args.no_nncf)
    header = deploy.machine_line()
    console.print(header, markup=False, highlight=False)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += model_rows(name, tools, args.rounds, args.processes, Path(tmp), console)
    markdown = ptq.render([table(rows, tools)], console)
    console.log(f"done in {time.perf_counter() - start:.0f} s")
    deploy.write_results(args.out, "Transformers at deployment sizes in OpenVINO: lowbit vs NNCF",
                         "bench/attention_latency.py", argv, header, markdown)
    console.print(f"Markdown table: {args.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
