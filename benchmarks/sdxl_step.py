"""SDXL's U-Net training step: ours against diffusers' at 1024 px (speed, MFU, peak memory), the
largest batch, and the peak memory of each way to fit a card (gradient checkpointing, the
optimizer step inside backward, Adafactor, 8-bit AdamW, LoRA rank 32), each way in a fresh
process, with diffusers' step beside them. Prints the tables; ``--json`` for the GPU suite,
``--md`` for a page of its own.

    python benchmarks/sdxl_step.py                          # a GPU: sdxl at 1024 px, batch 1
    python benchmarks/sdxl_step.py --device cpu --unet sdxl --override model_channels=96 \\
        --px 256 --memory-only --md docs/benchmarks/sdxl_memory_cpu.md   # what each way saves
    python benchmarks/sdxl_step.py --device cpu --unet sdxl_tiny --px 64 --batch 2 --tiny

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the whole step, weights
included; on the CPU the process's peak resident set over what it held before the U-Net was
built (the allocator's caching included). Goals (issue 23): LoRA rank 32 under 12 GiB and a full
fine-tune under 24 GiB, SDXL at 1024 px, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ROOT,
    device_info,
    diffusers_unet,
    is_oom,
    md_table,
    unet_preset,
    write_result,
)
from unet_step import Batch, compare, compare_table, forward_of, largest_batch  # noqa: E402

# the ways to fit a card: (optimizer, 8-bit, gradient checkpointing, step in backward, LoRA rank,
# diffusers' U-Net); each measured in a process of its own
WAYS = {
    "AdamW": ("adamw", False, False, False, None, False),
    "AdamW, checkpointing": ("adamw", False, True, False, None, False),
    "AdamW, checkpointing, step in backward": ("adamw", False, True, True, None, False),
    "8-bit AdamW, checkpointing, step in backward": ("adamw", True, True, True, None, False),
    "Adafactor, checkpointing": ("adafactor", False, True, False, None, False),
    "Adafactor, checkpointing, step in backward": ("adafactor", False, True, True, None, False),
    "LoRA rank 32 (AdamW), checkpointing": ("adamw", False, True, False, 32, False),
    "diffusers' U-Net, AdamW, checkpointing": ("adamw", False, True, False, None, True),
}
GIB = 2**30


def _rss(peak: bool = False) -> int:
    """The process's resident set now, or its peak so far."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    import psutil

    return psutil.Process().memory_info().rss


def one_way(args, name: str) -> dict[str, Any]:
    """Build the U-Net, its optimizer as ``name`` says, run warm-up and timed steps; the peak."""
    from sd_lightning.finetune.lora import LoRA
    from sd_lightning.systems.optim import make_optimizer

    optimizer, eight_bit, ckpt, backward, rank, diffusers = WAYS[name]
    device = torch.device(args.device)
    if eight_bit and device.type != "cuda":
        return {"way": name, "skipped": "8-bit AdamW needs CUDA"}
    before = _rss()
    torch.manual_seed(0)
    with torch.device(device):
        net = unet_preset(args.unet, **_overrides(args))
    config = net.config
    if diffusers:
        net = diffusers_unet(net, args.px // 8)
        if ckpt:
            net.enable_gradient_checkpointing()
    else:
        net.gradient_checkpointing = ckpt
    if rank:
        net = LoRA(rank=rank, targets="attention").apply(net)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(
        params, name=optimizer, eight_bit=eight_bit, step_in_backward=backward, lr=1e-5
    )
    batch = Batch(args.batch, args.px // 8, config, device)
    forward = forward_of(net, diffusers)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = F.mse_loss(forward(batch).float(), batch.target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step()  # warm-up: the optimizer's state exists from here
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - began) / args.steps
    except Exception as e:
        if not is_oom(e):
            raise
        return {"way": name, "skipped": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss(True) - before
    return {
        "way": name,
        "trained_params": sum(p.numel() for p in params),
        "peak_gib": peak / GIB,
        "s_per_step": seconds,
        "images_per_s": args.batch / seconds,
    }


def _overrides(args) -> dict[str, Any]:
    out = {}
    for item in args.override:
        key, value = item.split("=", 1)
        out[key] = json.loads(value)
    return out


def memory(args, argv: list[str], rows: list[dict[str, Any]], saved=lambda: None):
    """Every way in a fresh process of this script (``--way NAME``), each row into ``rows`` and
    ``saved()`` called as it comes (a part stopped at its time limit keeps the ways it ran)."""
    names = list(WAYS)
    for name in [names[int(i)] for i in args.ways.split(",")] if args.ways else names:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--way", name],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=args.way_timeout,
        )
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        row = json.loads(line) if proc.returncode == 0 and line else None
        rows.append(
            row or {"way": name, "skipped": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
        )
        print(json.dumps(rows[-1]), flush=True)
        saved()
    return rows


def memory_table(rows: list[dict[str, Any]], px: int, batch: int):
    base = next((r for r in rows if r["way"] == "AdamW" and "peak_gib" in r), None)
    header = ["way", "trained parameters", "peak GiB", "vs AdamW", "s/step", "images/s"]
    body = []
    for r in rows:
        if "peak_gib" not in r:
            body.append([r["way"], "-", r.get("skipped", "-"), "-", "-", "-"])
            continue
        saved = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if base and base["peak_gib"] else "-"
        body.append(
            [
                r["way"],
                f"{r['trained_params'] / 1e6:,.1f}M",
                f"{r['peak_gib']:.2f}",
                saved,
                f"{r['s_per_step']:.3f}",
                f"{r['images_per_s']:.2f}",
            ]  # fmt: skip
        )
    return header, body


def to_markdown(result: dict[str, Any]) -> str:
    args = result.get("args", {})
    parts = []
    if result.get("compare"):
        parts.append(md_table(*compare_table(result["compare"])))
    lb = result.get("largest_batch") or {}
    if "predicted" in lb:
        parts.append(
            f"Largest batch at {lb['px']} px: {lb['gib_per_image']:.2f} GiB per image, predicted "
            f"{lb['predicted']} in {lb['device_gib']:.0f} GiB; one step ran at batch "
            f"{lb.get('verified', 'none')} (peak {lb.get('verified_peak_gib', 0):.1f} GiB)."
        )
    if result.get("memory"):
        parts.append(
            f"Each way to fit a card, {args.get('unet')} at {args.get('px')} px, batch "
            f"{args.get('batch')}, one process each:\n\n"
            + md_table(*memory_table(result["memory"], args.get("px"), args.get("batch")))
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--unet", default="sdxl")
    p.add_argument("--override", action="append", default=[], help="preset key=value (JSON)")
    p.add_argument("--px", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="batch of the memory table")
    p.add_argument("--compare-batch", type=int, default=2, help="batch against diffusers")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes (the suite's test)")
    p.add_argument("--ways", default="", help="only these ways, by number (0-based), e.g. 0,2")
    p.add_argument("--way", default=None, help=argparse.SUPPRESS)
    p.add_argument("--way-timeout", type=float, default=300)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    if args.way:  # a child: one way, its figures as a JSON line
        print(json.dumps(one_way(args, args.way)))
        return {}
    device = torch.device(args.device)
    info = device_info(device)
    result: dict[str, Any] = {"device": info, "args": vars(args), "errors": []}
    child = [a for a in argv if a not in ("--memory-only", "--tiny")]
    child = [a for i, a in enumerate(child) if a not in ("--json", "--md") and (
        i == 0 or child[i - 1] not in ("--json", "--md"))]  # fmt: skip
    if not args.memory_only and args.override:
        args.memory_only = True  # a shape of our own: nothing to compare with a release
    steps = SimpleNamespace(
        cases=f"{args.unet}:{args.px}:{args.compare_batch}", optimizer="adamw", warmup=1,
        steps=args.steps, rounds=2, precision="bf16" if device.type == "cuda" else "fp32",
        ladder=f"{args.unet}:{args.px}:{args.compare_batch}",
    )  # fmt: skip

    def save() -> None:
        write_result(args.json, result, quiet=True)

    for part, fn in (
        (
            "compare",
            lambda: [] if args.memory_only else compare(steps, device, info["peak_tflops"]),
        ),
        ("largest_batch", lambda: None if args.memory_only else largest_batch(steps, device)),
        ("memory", lambda: memory(args, child, result.setdefault("memory", []), save)),
    ):
        try:
            result[part] = fn()
        except Exception as e:  # one part's failure keeps the others' figures
            import traceback

            traceback.print_exc()
            result["errors"].append(f"{part}: {type(e).__name__}: {e}")
        write_result(args.json, result, quiet=True)
    md = to_markdown(result)
    print(md)
    if args.md:
        command = "python benchmarks/sdxl_step.py " + " ".join(argv)
        with open(args.md, "w") as f:
            f.write(
                f"# SDXL's U-Net: what each way to fit a card costs\n\n`{command}` on "
                f"{info['name']}, {info['cpu_count']} cores, torch {info['torch']}, "
                f"{time.strftime('%Y-%m-%d')}.\n\n{md}\n"
            )
    return result


if __name__ == "__main__":
    main()
