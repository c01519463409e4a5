"""Export parity and ONNX Runtime latency of zoo models with every conv type.

For each conv type, the model (untrained, BN statistics and affine parameters randomised so
that BN folding is really exercised) is exported with :func:`leanconv.export.export_model`
(prepared for inference, dynamic batch, ONNX with the exporter's optimiser on) and checked in
ONNX Runtime against PyTorch eval mode on random inputs at batch 1 and 2. Latency is the median
per forward call at batch 1, PyTorch eager on ``prepare_for_inference(model)`` (channels_last,
leanconv's inference path) beside ONNX Runtime, both with ``--threads`` intra-op threads.
Results are appended to a JSON file (one entry per model and conv, re-running replaces the
entry), so a long sweep can be run a few convs at a time; ``--markdown`` renders the file.

    python benchmarks/export.py --model resnet20 --input 32
    python benchmarks/export.py --model resnet50 --input 224 --convs vanilla,spconv
    python benchmarks/export.py --markdown benchmarks/results/export.md

Latencies are only meaningful when nothing else runs on the cores (the load average is saved).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import leanconv
from leanconv.export import export_model, load_runtime
from leanconv.tables import build_model, parse_input


def randomize_bns(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def measure(model_name: str, conv: str, input: str, threads: int, min_run_time: float) -> dict:
    torch.manual_seed(0)
    _, (h, w) = parse_input(input)
    model, name = build_model(model_name, conv, input=input, device="cpu")
    randomize_bns(model)
    with tempfile.TemporaryDirectory() as tmp:
        report = export_model(model, torch.randn(1, 3, h, w), format="onnx",
                              out=Path(tmp) / "m.onnx", batches=(1, 2), latency_batches=(1,),
                              threads=threads, min_run_time=min_run_time)
        # The float rounding floor: PyTorch fp32 and ONNX Runtime against PyTorch in float64,
        # on export_model's "random b2" batch.
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref64 = copy.deepcopy(model).double().eval()(x.double())
            ref32 = model.eval()(x)
        (ort,) = load_runtime(Path(tmp) / "m.onnx", "onnx")(x)
    scale = ref64.abs().max().item()
    fp64 = {"torch_fp32_vs_fp64": (ref32.double() - ref64).abs().max().item() / scale,
            "ort_vs_fp64": (ort.double() - ref64).abs().max().item() / scale}
    t_torch, t_ort = report.latency[1]
    return {"model": name, "input": f"{h}x{w}", "conv": conv,
            "max_abs": report.max_abs, "max_rel": report.max_rel,
            **fp64, "parity": [vars(p) for p in report.parity],
            "size_mb": report.size_bytes / 1e6,
            "torch_ms": 1e3 * t_torch, "ort_ms": 1e3 * t_ort, "threads": threads,
            "load": os.getloadavg(), "torch": torch.__version__}


def markdown(entries: list[dict]) -> str:
    import onnxruntime

    lines = [f"## ONNX export parity and latency (torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__})", "",
             "Random inputs at batch 1 and 2 (the export is traced at batch 2 with a dynamic "
             "batch dimension); PyTorch = the model in eval mode with its BNs (randomised "
             "statistics) unfolded; ONNX Runtime CPU provider. Latency: batch 1, median per "
             "call, PyTorch eager on `prepare_for_inference(model)` (channels_last) vs ONNX "
             "Runtime, same thread count.", "",
             "The two fp64 columns give the rounding floor: the relative difference of PyTorch "
             "fp32 and of ONNX Runtime to PyTorch in float64 on the batch-2 input.", "",
             "| model | input | conv | max abs diff | max rel diff | PyTorch fp32 vs fp64 | "
             "ORT vs fp64 | file MB | PyTorch b1 ms | ORT b1 ms | ORT / PyTorch | threads | "
             "load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['model']} | {e['input']} | {e['conv']} | {e['max_abs']:.2e} | "
                     f"{e['max_rel']:.2e} | {e['torch_fp32_vs_fp64']:.1e} | "
                     f"{e['ort_vs_fp64']:.1e} | {e['size_mb']:.1f} | {e['torch_ms']:.2f} | "
                     f"{e['ort_ms']:.2f} | {e['ort_ms'] / e['torch_ms']:.2f}x | {e['threads']} | "
                     f"{e['load'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--input", default="32")
    p.add_argument("--convs", default=",".join(leanconv.available_convs()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--json", default="benchmarks/results/export.json")
    p.add_argument("--markdown", default=None, help="render --json to this file and stop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the export and fp64 forwards too: a quiet neighbour
    path = Path(args.json)
    entries = json.loads(path.read_text()) if path.exists() else []
    if args.markdown:
        Path(args.markdown).write_text(markdown(entries))
        print(markdown(entries))
        return
    for conv in [c.strip() for c in args.convs.split(",") if c.strip()]:
        entry = measure(args.model, conv, args.input, args.threads, args.min_run_time)
        entries = [e for e in entries
                   if (e["model"], e["input"], e["conv"]) != (entry["model"], entry["input"],
                                                              conv)]
        entries.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entries, indent=1))
        print(f"{entry['model']} {conv}: max abs {entry['max_abs']:.3g} max rel "
              f"{entry['max_rel']:.3g} (fp32 vs fp64 {entry['torch_fp32_vs_fp64']:.2g}, ORT vs "
              f"fp64 {entry['ort_vs_fp64']:.2g}); b1 PyTorch {entry['torch_ms']:.2f} ms, "
              f"ONNX Runtime {entry['ort_ms']:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
