"""Real text: a BERT sentence encoder's INT8 embeddings, lowbit side by side with NNCF, on both paths.

Model and data (examples/sentences.py, no download): about 2,000 English
sentences from the Python documentation that ships with Python
(`pydoc_data.topics`), a WordPiece tokenizer and a 4-layer BERT (hidden 128)
trained on them with masked-language modelling (cached under
~/.cache/lowbit), mean-pooled and L2-normalised: a semantic-search encoder.

Calibration: the first N_CALIB sentences; evaluation: the last N_EVAL
(disjoint). Each item is one sentence at batch 1, as (input_ids,
attention_mask):
- padded: every sentence padded to 64 tokens (mask 0 on the padding);
- natural: each sentence at its own length (items of different shapes).

Paths: torch (the nn.Module in, lowbit's fake-quantized module / NNCF's
quantized module out, run in torch) and onnx (torch.onnx.export's FP32 file,
dynamic batch and sequence axes, QDQ out, run in ONNX Runtime). Both tools
run with their defaults and model_type "transformer".

Figures against the FP32 embeddings of the same path and mode: mean cosine
similarity, nearest-neighbour agreement (the fraction of evaluation
sentences whose nearest other sentence is the same as with FP32), output
SQNR. Check: lowbit's mean cosine and nearest-neighbour agreement >= NNCF's
on every path and mode.

    python bench/text.py [--calib N] [--eval N] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ptq  # noqa: E402  (puts examples/ and tests/ on sys.path)
import lowbit  # noqa: E402
import sentences  # noqa: E402
import side_by_side  # noqa: E402

RESULTS = HERE / "results" / "text.md"
N_CALIB, N_EVAL = 300, 500
MODES = ("padded", "natural")
INPUTS = ("input_ids", "attention_mask")


def fp32_onnx(encoder, item: dict, path: Path) -> Path:
    axes = {"batch": 0, "sequence": 1}
    dynamic = {name: {i: n for n, i in axes.items()} for name in INPUTS}
    dynamic["embedding"] = {0: "batch"}
    torch.onnx.export(copy.deepcopy(encoder), tuple(item[n] for n in INPUTS), str(path), dynamo=False,
                      input_names=list(INPUTS), output_names=["embedding"], dynamic_axes=dynamic)
    return path


def as_data(items: list[dict], origin: str) -> list:
    """Calibration items as each path takes them: (ids, mask) tuples for torch, {name: array} for ONNX."""
    if origin == "torch":
        return [tuple(i[n] for n in INPUTS) for i in items]
    return [{n: i[n].numpy() for n in INPUTS} for i in items]


def quantize(tool: str, origin: str, source, items: list[dict]):
    """(quantized model or ptq.Failed, seconds)."""
    data = as_data(items, origin)
    try:
        if tool == "lowbit":
            return ptq.timed(lambda: lowbit.quantize(source, lowbit.Dataset(data), subset_size=len(data),
                                                     model_type="transformer"))
        import nncf

        return ptq.timed(lambda: nncf.quantize(source, nncf.Dataset(data), subset_size=len(data),
                                               model_type=nncf.ModelType.TRANSFORMER))
    except Exception as e:
        return ptq.Failed(e), None


def embeddings(origin: str, model, items: list[dict]) -> np.ndarray:
    """One embedding per item, computed one sentence at a time."""
    if origin == "torch":
        with torch.no_grad():
            return np.concatenate([model(*(i[n] for n in INPUTS)).numpy() for i in items])
    session = ptq.ort_session(model)
    return np.concatenate([session.run(None, {n: i[n].numpy() for n in INPUTS})[0] for i in items])


def metrics(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """Mean cosine, nearest-neighbour agreement and SQNR of INT8 embeddings against FP32."""
    def unit(e):
        return e / np.linalg.norm(e, axis=1, keepdims=True).clip(1e-12)

    def nearest(e):
        sim = unit(e) @ unit(e).T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    cosine = float((unit(fp32) * unit(int8)).sum(axis=1).mean())
    return {"cosine": cosine, "nn": float((nearest(fp32) == nearest(int8)).mean()),
            "sqnr": ptq.sqnr_db(fp32, int8)}


def rows_for(origin: str, mode: str, encoder, calib: list[dict], held_out: list[dict], tools: list[str],
             onnx_path: Path, console) -> dict:
    row = {"origin": origin, "mode": mode}
    reference = encoder if origin == "torch" else str(onnx_path)
    fp32 = embeddings(origin, reference, held_out)
    for tool in tools:
        import onnx

        source = copy.deepcopy(encoder) if origin == "torch" else onnx.load(onnx_path)
        q, seconds = quantize(tool, origin, source, calib)
        if isinstance(q, ptq.Failed):
            row[f"{tool}_failed"] = q.reason
            console.log(f"{origin} {mode} {tool}: {q.reason}")
            continue
        try:
            row.update({f"{tool}_{k}": v for k, v in metrics(fp32, embeddings(origin, q, held_out)).items()})
        except Exception as e:  # quantized, but the result does not run on these inputs
            row[f"{tool}_failed"] = ptq.Failed(e).reason
        row[f"{tool}_s"] = seconds
        console.log(f"{origin} {mode} {tool}: cosine {row.get(f'{tool}_cosine', float('nan')):.5f}, "
                    f"nn {row.get(f'{tool}_nn', float('nan')):.3f}, {seconds:.1f} s")
    return row


def checks(rows: list[dict], use_nncf: bool) -> list[list[str]]:
    out = []
    for r in rows:
        where = f"{r['origin']} {r['mode']}"
        ok = "lowbit_cosine" in r
        out.append([where, "quantizes and runs" if ok else r.get("lowbit_failed", "?"), "lowbit quantizes",
                    "PASS" if ok else "FAIL"])
        if not (use_nncf and ok and "nncf_cosine" in r):
            continue
        for key, label, fmt in (("cosine", "mean cosine", ".5f"), ("nn", "nearest-neighbour agreement", ".3f")):
            mine, theirs = r[f"lowbit_{key}"], r[f"nncf_{key}"]
            out.append([where, f"{mine:{fmt}} vs {theirs:{fmt}}", f"lowbit {label} >= NNCF's",
                        "PASS" if mine >= theirs else "FAIL"])
    return out


def tables(rows: list[dict], check_rows: list[list[str]], tools: list[str]):
    cell = side_by_side.Cells(lambda r: f"{r['origin']} {r['mode']}")

    head = ["origin", "inputs"]
    for key in ("mean cosine", "NN agreement", "SQNR dB", "PTQ s"):
        head += [f"{t} {key}" for t in tools]
    body = []
    for r in rows:
        cells = [r["origin"], r["mode"]]
        for key, fmt in (("cosine", ".5f"), ("nn", ".3f"), ("sqnr", ".1f"), ("s", ".1f")):
            cells += [cell(r, t, key, fmt) for t in tools]
        body.append(cells)
    return [("Sentence embeddings, INT8 vs FP32 (held-out sentences)", head, body, cell.notes),
            ("Checks", ["where", "measured", "figure", "result"], check_rows, [])]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=N_CALIB, help=f"calibration sentences (default {N_CALIB})")
    parser.add_argument("--eval", type=int, default=N_EVAL, help=f"held-out sentences (default {N_EVAL})")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF columns")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    run = side_by_side.Run("text.py", argv, args.no_nncf)
    console, tools = run.console, run.tools
    encoder = sentences.encoder()
    corpus = sentences.sentences()
    calib_text, eval_text = corpus[:args.calib], corpus[-args.eval:]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = fp32_onnx(encoder, sentences.encode(calib_text[:1], padded=True)[0], Path(tmp) / "fp32.onnx")
        for mode in MODES:
            calib = sentences.encode(calib_text, padded=mode == "padded")
            held_out = sentences.encode(eval_text, padded=mode == "padded")
            for origin in ("torch", "onnx"):
                rows.append(rows_for(origin, mode, encoder, calib, held_out, tools, onnx_path, console))
    run.write(args.out, "Real text: sentence embeddings, lowbit vs NNCF",
              f"{args.calib} calibration sentences, {args.eval} held-out sentences.",
              tables(rows, checks(rows, "nncf" in tools), tools))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
