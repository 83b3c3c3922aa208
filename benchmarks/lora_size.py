"""LoRA's size on Stable Diffusion's U-Nets: trainable parameters, and the bytes of the LoRA file
(kohya's format, float32 as exported; float16 halves it) and of a checkpoint's trained state
(the adapters plus AdamW's two moments), against the full U-Net, for each rank and target set.

    .venv/bin/python benchmarks/lora_size.py          # prints the table, writes docs/benchmarks/lora.md

The U-Nets are built on the meta device (nothing allocated); the adapters are peft's, injected as
``finetune=lora`` injects them. Counting only: no timing, so any machine gives the same table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, md_table, unet_preset  # noqa: E402

from sd_lightning.finetune.lora import LoRA  # noqa: E402

MIB = 2**20


def measure(preset: str, rank: int, targets: str) -> list:
    with torch.device("meta"):
        unet = unet_preset(preset)
        total = sum(p.numel() for p in unet.parameters())
        lora = LoRA(rank=rank, targets=targets)
        layers = len(lora.module_names(unet))
        unet = lora.apply(unet)
    trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    file_mib = (trained * 4 + layers * 4) / MIB  # float32 A and B, one alpha per layer
    ckpt_mib = trained * 4 * 3 / MIB  # weights + AdamW's exp_avg and exp_avg_sq
    return [
        preset,
        targets,
        rank,
        layers,
        f"{trained:,}",
        f"{trained / total:.2%}",
        file_mib,
        ckpt_mib,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks", "lora.md"))
    args = parser.parse_args()
    rows = [
        measure(preset, rank, targets)
        for preset in ("sd15", "sd2")
        for targets in ("attention", "attention_ff", "all")
        for rank in (4, 16, 64)
    ]
    with torch.device("meta"):
        full = {p: sum(x.numel() for x in unet_preset(p).parameters()) for p in ("sd15", "sd2")}
    header = [
        "U-Net",
        "targets",
        "rank",
        "layers",
        "trainable parameters",
        "of the U-Net",
        "LoRA file (MiB, fp32)",
        "checkpoint's trained state (MiB)",
    ]
    table = md_table(header, rows)
    full_line = ", ".join(
        f"{p}: {n:,} parameters, {n * 4 / MIB:,.0f} MiB in float32 "
        f"({n * 4 * 3 / MIB:,.0f} MiB with AdamW's moments)"
        for p, n in full.items()
    )
    doc = "\n".join(
        [
            "# LoRA on SD's U-Nets: trainable parameters and file sizes",
            "",
            "`finetune=lora` trains only peft's adapters; its checkpoints hold them (and AdamW's "
            "state for them) with a reference to the base weights, and `export/lora.safetensors` "
            "holds them in kohya's format. Counted on the meta device (no timing: any machine "
            "gives this table).",
            "",
            "`.venv/bin/python benchmarks/lora_size.py`",
            "",
            table,
            "",
            f"The whole U-Net, for comparison: {full_line}.",
            "",
            "targets: `attention` = q, k, v and output projections of every transformer block "
            "(diffusers' default); `attention_ff` adds the GEGLU feed-forward and the "
            "transformers' in/out projections (kohya's default set); `all` adds every ResNet "
            "convolution and the down/up-sampling convolutions (LoCon).",
            "",
        ]
    )
    print(table)
    if args.doc:
        with open(args.doc, "w") as f:
            f.write(doc)
        print(f"written: {args.doc}")


if __name__ == "__main__":
    main()
