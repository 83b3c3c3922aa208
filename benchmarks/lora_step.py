"""A training step of LoRA against full fine-tuning: the same U-Net, batch and loss, one with
every weight trained by AdamW, the others with peft's adapters only (rank 4 and 16 on the
attention projections). Prints a table and writes docs/benchmarks/lora_step_<device>.md.

    .venv/bin/python benchmarks/lora_step.py                   # the demo's tiny U-Net, CPU
    .venv/bin/python benchmarks/lora_step.py --unet sd15 --batch 8 --size 64   # on a GPU
                                                        # (a part of make gpu-suite)

Steps are timed interleaved (each setting in turn, several rounds, median), after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT, device_info, interleaved, md_table, unet_preset  # noqa: E402

from sd_lightning.finetune.lora import LoRA  # noqa: E402


def make_step(unet_name: str, rank: int | None, batch: int, size: int, device: torch.device):
    """One optimizer step of ``unet`` (``rank``: LoRA of that rank, None: every weight)."""
    torch.manual_seed(0)
    unet = unet_preset(unet_name)
    if rank is not None:
        unet = LoRA(rank=rank, targets="attention").apply(unet)
    unet = unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g).to(device)
    ctx = torch.randn(batch, 77, unet.config["context_dim"], generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = F.mse_loss(unet(x, t, ctx).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    trained = sum(p.numel() for p in params)
    return step, trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="tiny", help="a conf/unet preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--doc", default=None, help="markdown output (default: docs/benchmarks/)")
    parser.add_argument("--json", default=None, help="also write the figures here (gpu_suite)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"full fine-tuning": None, "LoRA rank 4": 4, "LoRA rank 16": 16}
    steps, trained = {}, {}
    for name, rank in settings.items():
        steps[name], trained[name] = make_step(args.unet, rank, args.batch, args.size, device)
        for _ in range(2):
            steps[name]()  # warm-up
    times = interleaved(steps, args.steps, args.rounds, device)
    full = times["full fine-tuning"]
    info = device_info(device)
    figures = {
        "device": info,
        "unet": args.unet,
        "batch": args.batch,
        "size": args.size,
        "rows": [
            [name, trained[name], times[name] * 1000, full / times[name]] for name in settings
        ],
    }
    table = markdown(figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    where = f"{info.get('name') or 'CPU'}, {info['cpu_count']} CPU cores"
    command = "python benchmarks/lora_step.py " + " ".join(sys.argv[1:])
    doc = "\n".join(
        [
            "# A LoRA training step against full fine-tuning",
            "",
            f"`{command.strip()}` on {where}, torch {info['torch']}: U-Net `{args.unet}`, batch "
            f"{args.batch}, {args.size}x{args.size} latents, 77 context tokens, AdamW; "
            f"median of {args.rounds} interleaved rounds of {args.steps} steps.",
            "",
            table,
            "",
            "LoRA still runs the whole forward and the backward through every activation; it "
            "saves the weight gradients of the frozen layers and the optimizer's work on them.",
            "",
        ]
    )
    print(table)
    if args.json and not args.doc:  # a part of gpu_suite: its markdown is docs/benchmarks/gpu.md
        return
    path = args.doc or os.path.join(
        ROOT, "docs", "benchmarks", f"lora_step_{'gpu' if device.type == 'cuda' else 'cpu'}.md"
    )
    with open(path, "w") as f:
        f.write(doc)
    print(f"written: {path}")


def markdown(r: dict) -> str:
    """The table of a run's figures (here and in docs/benchmarks/gpu.md)."""
    rows = [[name, f"{n:,}", ms, speed] for name, n, ms, speed in r["rows"]]
    header = [
        f"U-Net {r['unet']}, batch {r['batch']}, {r['size']}x{r['size']} latents",
        "trained parameters",
        "ms / step",
        "speed vs full",
    ]
    return md_table(header, rows)


if __name__ == "__main__":
    main()
