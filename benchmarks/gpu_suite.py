"""Every GPU check in one go, inside a time budget: ``make gpu-suite`` on the GPU machine.

    python benchmarks/gpu_suite.py                       # all parts, 420 s budget
    python benchmarks/gpu_suite.py --only ldm_step,sampling --budget 200   # a re-run of some
    python benchmarks/gpu_suite.py --tiny --results /tmp/r --out /tmp/gpu.md   # CPU, tiny sizes
    python benchmarks/gpu_suite.py --render              # remake gpu.md from the stored JSON

Parts, in order (each a subprocess with its own time limit, so one failure or hang costs only
its share): ``tests`` (``pytest -m gpu``: both stages from the CLI on the GPU), ``unet_step``
(ours against diffusers, the trick ladder, the largest batch), ``ldm_step`` (Lightning's
overhead on the stage-2 step), ``vae_step`` (stage 1 at SD size), ``sampling`` (50 DDIM steps
against diffusers' pipeline), ``lora_step`` (a LoRA step against a full fine-tuning step),
``sdxl_step`` (SDXL at 1024 px against diffusers, the largest batch, the memory of each way to
fit a card: LoRA rank 32, full fine-tuning with checkpointing, Adafactor, 8-bit AdamW, the step
in backward), ``eval_speed`` (``stage=eval``'s generation, Inception features and CLIP score
in images/s, against torchmetrics' FID update), ``repa_step`` (U-REPA's step against the plain
one, DINOv2 online and precomputed, and REPA-E's whole step). Each part leaves ``<results>/<part>.json``; the markdown
(``docs/benchmarks/gpu.md``) is made from every JSON in the results folder, so a re-run of some
parts keeps the others' figures. With ``$OUT`` set (the device tool), the markdown, the JSON and
the logs are copied there too.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ROOT  # noqa: E402

PY = sys.executable


@dataclass
class Part:
    title: str
    args: list[str]  # after the interpreter
    timeout: float  # seconds at most
    needs: float  # seconds it needs at least (else skipped)
    tiny_args: list[str] = field(default_factory=list)


def parts() -> dict[str, Part]:
    xdist = " -n 6" if importlib.util.find_spec("xdist") else ""  # one test per worker
    tests = "-m pytest -m gpu tests/test_gpu.py -q -rA --tb=short --timeout=180" + xdist
    unet_tiny = (
        "benchmarks/unet_step.py --device cpu --precision fp32 --cases tiny:128:4 --ladder "
        "tiny:128:4 --steps 1 --rounds 1 --warmup 1 --budget 300 --compile-cost 1000"
    )
    ldm_tiny = (
        "benchmarks/lightning_steps.py ldm --unet tiny --vae tiny --px 64 --batch 4 "
        "--trainer cpu --workers 0 --warmup 2 --steps 2"
    )
    vae_tiny = (
        "benchmarks/lightning_steps.py vae --vae tiny --px 32 --batch 4 --trainer cpu "
        "--workers 0 --warmup 1 --steps 2 --override vae.ch=16 --override vae.norm_groups=8"
    )
    sampling_tiny = (
        "benchmarks/sampling.py --unet tiny --vae tiny --px 64 --device cpu --steps 3 --rounds 1"
    )
    lora_tiny = "benchmarks/lora_step.py --unet tiny --batch 2 --size 8 --steps 1 --rounds 1"
    sdxl_tiny = (
        "benchmarks/sdxl_step.py --device cpu --unet sdxl_tiny --px 64 --batch 2 "
        "--compare-batch 2 --steps 1 --ways 0,2,6"
    )
    eval_tiny = (
        "benchmarks/eval_speed.py --unet tiny --vae tiny --px 64 --steps 2 --batch 4 "
        "--clip ViT-B-32 --rounds 1 --device cpu"
    )
    repa_tiny = (
        "benchmarks/repa_step.py --unet tiny --vae tiny --px 64 --batch 2 --dino tiny --resolution 56 "
        "--steps 1 --rounds 1 --device cpu"
    )
    return {
        "tests": Part(
            "GPU tests: both stages from the CLI (`pytest -m gpu`)",
            tests.split(),
            timeout=200,
            needs=60,
        ),
        "unet_step": Part(
            "U-Net training step: ours against diffusers, the ladder, the largest batch",
            "benchmarks/unet_step.py --largest-batch --steps 6 --budget 150".split(),
            timeout=200,
            needs=90,
            tiny_args=unet_tiny.split(),
        ),
        "ldm_step": Part(
            "Stage 2 as users run it: Lightning, loader, EMA, logging against the bare step",
            "benchmarks/lightning_steps.py ldm --unet sd15 --px 512 --batch 32".split(),
            timeout=120,
            needs=45,
            tiny_args=ldm_tiny.split(),
        ),
        "vae_step": Part(
            "Stage 1 at SD's size (vae=sd, 256 px, LPIPS and PatchGAN)",
            "benchmarks/lightning_steps.py vae --vae sd --px 256 --batch 8".split(),
            timeout=80,
            needs=40,
            tiny_args=vae_tiny.split(),
        ),
        "sampling": Part(
            "Sampling: 50 DDIM steps at 512 px, ours against diffusers' StableDiffusionPipeline",
            ["benchmarks/sampling.py"],
            timeout=60,
            needs=35,
            tiny_args=sampling_tiny.split(),
        ),
        "lora_step": Part(
            "Fine-tuning: a LoRA step (rank 4 and 16) against a full fine-tuning step, SD 1.5",
            "benchmarks/lora_step.py --unet sd15 --batch 8 --size 64 --steps 3 --rounds 3".split(),
            timeout=100,
            needs=50,
            tiny_args=lora_tiny.split(),
        ),
        "sdxl_step": Part(
            "SDXL at 1024 px: ours against diffusers, the largest batch, each way to fit a card",
            ["benchmarks/sdxl_step.py"],
            timeout=420,
            needs=180,
            tiny_args=sdxl_tiny.split(),
        ),
        "eval_speed": Part(
            "stage=eval at 512 px: generation, Inception features, CLIP score (images/s)",
            ["benchmarks/eval_speed.py"],
            timeout=150,
            needs=60,
            tiny_args=eval_tiny.split(),
        ),
        "repa_step": Part(
            "Alignment's cost: SD 1.5 at 256 px, plain against U-REPA and REPA-E's whole step",
            ["benchmarks/repa_step.py"],
            timeout=120,
            needs=50,
            tiny_args=repa_tiny.split(),
        ),
    }


def run_part(name: str, part: Part, args, timeout: float) -> dict[str, Any]:
    """Run one part, its output into ``<results>/<name>.log``; returns its JSON (or why none)."""
    cmd = part.tiny_args if args.tiny else part.args
    json_path = os.path.join(args.results, f"{name}.json")
    for old in os.listdir(
        args.results
    ):  # figures of earlier partial runs of this part (git has them)
        if old.startswith(f"{name}_") and old.endswith(".json"):
            os.remove(os.path.join(args.results, old))
    if name != "tests":
        cmd = [*cmd, "--json", json_path]
    log_path = os.path.join(args.logs, f"{name}.log")
    began = time.monotonic()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": _pythonpath(),
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded; the GPU machine reaches no network
        "WANDB_MODE": "offline",
    }
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                [PY, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout
            )
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f} s"
    wall = time.monotonic() - began
    command = "python " + " ".join(cmd[:-2] if name != "tests" else cmd)
    result: dict[str, Any] = {}
    if name == "tests":
        result = {"summary": _pytest_summary(log_path)}
    elif os.path.isfile(json_path):
        with open(json_path) as f:
            result = json.load(f)
    result.update(part=name, command=command, returncode=code, wall_s=wall, date=_now())
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"[gpu-suite] {name}: exit {code}, {wall:.0f} s (log: {log_path})", flush=True)
    return result


def _pythonpath() -> str:
    return os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)


def _pytest_summary(log_path: str) -> dict[str, Any]:
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    outcomes = [ln for ln in lines if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    last = next(
        (
            ln
            for ln in reversed(lines)
            if " in " in ln
            and ("passed" in ln or "failed" in ln or "skipped" in ln or "error" in ln)
        ),
        "",
    )
    return {"last_line": last.strip("= "), "outcomes": outcomes[:40]}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- markdown ------------------------------------------------------------------------------------
def render(results: dict[str, dict[str, Any]], all_parts: dict[str, Part], notes: str = "") -> str:
    from eval_speed import markdown as eval_markdown
    from lightning_steps import ldm_markdown, vae_markdown
    from lora_step import markdown as lora_markdown
    from repa_step import markdown as repa_markdown
    from sampling import markdown as sampling_markdown
    from sdxl_step import to_markdown as sdxl_markdown
    from unet_step import to_markdown as unet_markdown

    renderers = {
        "unet_step": unet_markdown,
        "ldm_step": ldm_markdown,
        "vae_step": vae_markdown,
        "sampling": sampling_markdown,
        "lora_step": lora_markdown,
        "sdxl_step": sdxl_markdown,
        "eval_speed": eval_markdown,
        "repa_step": repa_markdown,
    }
    device = next((r["device"] for r in results.values() if r.get("device")), {})
    lines = [
        "# GPU figures (`make gpu-suite`)",
        "",
        "Made by `benchmarks/gpu_suite.py`; each part says its command, device and date. MFU is "
        "against the datasheet dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; A100: 312), FLOPs "
        "counted by `torch.utils.flop_counter` (convolutions, matmuls, attention).",
        "",
    ]
    if device:
        lines += [
            f"Device: **{device.get('name')}** ({device.get('memory_gib', '?')} GiB), torch "
            f"{device.get('torch')}, CUDA {device.get('cuda', '-')}, cuDNN "
            f"{device.get('cudnn', '-')}, Python {device.get('python')}, "
            f"{device.get('cpu_count')} CPU cores.",
            "",
        ]
    if notes:
        lines += [notes.strip(), ""]
    for name, part in all_parts.items():
        lines += [f"## {part.title}", ""]
        runs = [r for key, r in sorted(results.items()) if key.split(".")[0].startswith(name)]
        if not runs:
            lines += ["Not run yet.", ""]
        for r in runs:
            lines += _render_run(name, r, renderers)
    return "\n".join(lines).rstrip() + "\n"


def _render_run(name: str, r: dict[str, Any], renderers: dict[str, Any]) -> list[str]:
    dev = (r.get("device") or {}).get("name", "")
    lines = [
        f"`{r['command']}`: exit {r['returncode']}, {r['wall_s']:.0f} s, {r['date']}"
        + (f", {dev}" if dev else "")
        + ".",
        "",
    ]
    if name == "tests":
        summary = r.get("summary", {})
        lines += [f"Result: {summary.get('last_line') or 'no pytest summary (see the log)'}", ""]
        return lines + [f"- {o}" for o in summary.get("outcomes", [])] + [""]
    try:
        lines += [renderers[name](r), ""]
    except Exception as e:  # a part that died before its figures: say so, keep the rest
        lines += [f"No figures ({type(e).__name__}: {e}); see the log.", ""]
    return lines + [f"- {error}" for error in r.get("errors", [])] + [""]


def _pack_for_device_tool(args) -> None:
    """Under the device tool: the markdown and one archive of the JSON and logs into ``$OUT``."""
    out = os.environ.get("OUT")
    if not out or not os.path.isdir(out):
        return
    shutil.copy(args.out, os.path.join(out, os.path.basename(args.out)))
    inside = [
        os.path.abspath(d).startswith(os.path.abspath(out)) for d in (args.results, args.logs)
    ]
    if not all(inside):
        with tarfile.open(os.path.join(out, "gpu-suite.tar.gz"), "w:gz") as tar:
            tar.add(args.results, arcname="results")
            tar.add(args.logs, arcname="logs")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts")
    p.add_argument("--render", action="store_true", help="only remake the markdown from --results")
    p.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny sizes (make test runs this)")
    p.add_argument("--results", default=os.path.join(ROOT, "docs", "benchmarks", "gpu"))
    p.add_argument("--logs", default=None, help="default: $OUT/logs or <results>/../gpu-logs")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "gpu.md"))
    args = p.parse_args(argv)
    all_parts = parts()
    chosen = [n for n in args.only.split(",") if n] or list(all_parts)
    unknown = [n for n in chosen if n not in all_parts]
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {list(all_parts)}")
    if args.tiny:
        chosen = [n for n in chosen if all_parts[n].tiny_args]
    args.logs = args.logs or os.path.join(
        os.environ.get("OUT") or os.path.dirname(args.results), "gpu-logs"
    )
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.logs, exist_ok=True)
    deadline = time.monotonic() + args.budget
    failed = []
    for name in [] if args.render else chosen:
        part = all_parts[name]
        left = deadline - time.monotonic()
        if left < (5 if args.tiny else part.needs):
            print(f"[gpu-suite] {name}: not run, {left:.0f} s of the budget left", flush=True)
            continue
        result = run_part(name, part, args, min(part.timeout * (3 if args.tiny else 1), left))
        if result["returncode"] != 0:
            failed.append(name)
    results = {}  # <part>.json, and <part>_<more>.json from other runs of the part
    for file in sorted(os.listdir(args.results)):
        if file.endswith(".json") and file.split(".")[0].startswith(tuple(all_parts)):
            with open(os.path.join(args.results, file)) as f:
                results[file] = json.load(f)
    notes_path = os.path.join(args.results, "notes.md")  # what the figures say, by hand
    notes = open(notes_path).read() if os.path.isfile(notes_path) else ""
    text = render(results, all_parts, notes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    _pack_for_device_tool(args)
    if failed:
        print(f"[gpu-suite] failed: {', '.join(failed)} (logs in {args.logs})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
