"""How close each GGUF export type stays to the merged torch model, on the bundled SmolLM2-135M-Instruct.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/export_check.py [--quants f16,q8_0,q4_k_m] [--out DIR]

A random LoRA (rank 8, lora_B ~ N(0, 0.1)) is merged into the dequantised Q4_1 base; each type is
written, run in llama.cpp and compared with torch on the verification probes (mean KL, top-1
agreement), then checked against its bar. Also a LoRA GGUF applied on the unchanged Q4_1 base.
Prints one JSON object, then a table. Never asserts: a type below its bar shows passed=false.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.export import ExportRefused, export_adapter  # noqa: E402
from edge_unisd.modeling import load_base  # noqa: E402


def random_adapter(model, folder: Path) -> Path:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="f32,f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,lora")
    ap.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # --- base and adapter ---
    base = load_base(None)
    work = args.out or Path(tempfile.mkdtemp(prefix="export-check-"))
    adapter = random_adapter(base.model, work / "adapter")

    # --- one export per type ---
    rows = []
    for q in args.quants.split(","):
        fmt, quant = ("lora", "f32") if q == "lora" else ("merged", q)
        t = time.monotonic()
        try:
            result = export_adapter(base, adapter, work / "out", quant, fmt)
            report, size = result.verify, result.build.stat().st_size
        except ExportRefused as e:
            report, size = e.report, None
        rows.append({"type": q, "mean_kl": report.mean_kl, "top1": report.top1, "bar_top1": report.bar.top1_min,
                     "bar_kl": report.bar.kl_max, "passed": report.passed,
                     "size_mb": round(size / 2**20, 1) if size else None,
                     "seconds": round(time.monotonic() - t, 1), "positions": report.n_positions})

    print(json.dumps({"model": str(base.source.path.name), "adapter": "random r=8 B~N(0,0.1)", "rows": rows}))
    print(f"\n{'type':8} {'mean KL':>9} {'top-1':>6} {'bar':>14} {'ok':>3} {'MB':>7} {'s':>6}")
    for r in rows:
        bar = f">={r['bar_top1']}/<={r['bar_kl']}"
        print(f"{r['type']:8} {r['mean_kl']:9.5f} {r['top1']:6.3f} {bar:>14} {'yes' if r['passed'] else 'NO':>3} "
              f"{r['size_mb'] or '-':>7} {r['seconds']:6.1f}")


if __name__ == "__main__":
    main()
