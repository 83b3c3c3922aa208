"""How long each kind of command-line mistake takes to report: one real `python -m sd_lightning`
process per mistake, timed from start to exit, against a tiny diffusers-written base and a LoRA
trained on it. Prints the table and writes docs/benchmarks/cli_errors.md.

    .venv/bin/python benchmarks/cli_errors.py            # --repeat 3 takes the best of three
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny, diffusers-written fixtures

TINY = ["trainer=debug", "logger=none", "data.image_size=32", "data.batch_size=4"]
TINY += ["data.num_workers=0", "data.samples_per_epoch=32", "data.demo.image_size=32"]
TINY += ["data.demo.train_shards=3", "data.demo.val_shards=1", "data.demo.samples_per_shard=16"]


def fixtures(tmp: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image
    from sd_fixtures import SMALL_UNET, SMALL_VAE, pipeline_folder

    base, *_ = pipeline_folder(tmp, SMALL_UNET, SMALL_VAE, 16)
    photos = tmp / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 80 * i, np.uint8)).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text("a photo of <c1>")
    run = tmp / "lora_run"
    subprocess.run(
        [sys.executable, "-m", "sd_lightning", *TINY, "experiment=lora", f"pretrained={base}",
         "finetune.rank=4", "trainer.max_steps=1", "model.val_prompts=[]",
         f"paths.data_dir={tmp / 'data'}", f"hydra.run.dir={run}"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return {"base": base, "photos": photos, "lora": run / "export" / "lora.safetensors"}


def mistakes(f: dict[str, Path], tmp: Path) -> list[tuple[str, list[str]]]:
    run = [f"hydra.run.dir={tmp / 'run'}", f"paths.data_dir={tmp / 'data'}"]
    fit = ["data=folder", f"data.path={f['photos']}", "data.bucket_step=16", *TINY[:3]]
    fit += [f"pretrained={f['base']}", *run]
    sample = ["stage=sample", f"ckpt={f['base']}", "steps=1", *run]
    ldm = ["stage=ldm", *TINY, *run]
    return [
        ("a value out of range (`seed=-5`)", ["stage=vae", "seed=-5", *run]),
        ("a missing file (`ckpt=/nope`)", ["stage=sample", "ckpt=/nope", *run]),
        ("a fine-tuning option (`finetune.dropout=1.5`)", ["experiment=lora", *fit, "finetune.dropout=1.5"]),
        ("a fine-tuning option (`finetune.alpha=0`)", ["experiment=lora", *fit, "finetune.alpha=0"]),
        ("a data option (`data.bucket_step=0`)", ["experiment=lora", *fit, "data.bucket_step=0"]),
        ("`text_encoder.layer=99`", [*ldm, f"vae_ckpt={f['base']}", "text_encoder.layer=99"]),
        ("`lora_scale=abc`", [*sample, f"lora=[{f['lora']}]", "lora_scale=abc"]),
        ("the wrong kind of file (`vae_ckpt=<a LoRA>`)", [*ldm, f"vae_ckpt={f['lora']}"]),
        ("the wrong kind of folder (`pretrained=<a vae/ folder>`)", [*ldm, f"pretrained={f['base'] / 'vae'}"]),
        ("a LoRA of another size (`lora=` at sampling)", [*sample, f"lora=[{tmp / 'wide.safetensors'}]"]),
        ("a reused run directory (`experiment=dreambooth` in a LoRA run's)", ["experiment=dreambooth", *fit[:-2], f"hydra.run.dir={f['lora'].parent.parent}", f"paths.data_dir={tmp / 'data'}", "finetune.class_prompt=null"]),
    ]  # fmt: skip


def time_one(args: list[str], repeat: int) -> tuple[float, str]:
    best, line = float("inf"), ""
    for _ in range(repeat):
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "sd_lightning", *args], cwd=ROOT, capture_output=True, text=True
        )
        best = min(best, time.monotonic() - start)
        line = (
            out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        )
    return best, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "cli_errors.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        f = fixtures(tmp)
        import torch
        from safetensors.torch import load_file, save_file

        state = load_file(f["lora"])
        wide = {
            k: torch.zeros(4, 1024) if "attn2_to_k.lora_down" in k else v for k, v in state.items()
        }
        save_file(wide, tmp / "wide.safetensors")
        rows = []
        for what, command in mistakes(f, tmp):
            seconds, line = time_one(command, args.repeat)
            shown = line.replace(str(tmp), "<tmp>")
            rows.append((what, seconds, shown[:160] + ("..." if len(shown) > 160 else "")))
            print(f"{seconds:6.1f} s  {what}: {shown[:100]}")
    table = "\n".join(f"| {w} | {s:.1f} s | `{line}` |" for w, s, line in rows)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    text = f"""# How long a command-line mistake takes to report

`python -m sd_lightning` runs the stage's checks (`preflight:` in `conf/stage/`, with every
option of the data, the fine-tuning method, the text encoder and sampling in
`sd_lightning/commands/options.py`) before it imports Lightning or builds a model, so a bad value or
file is one line before any work. Each row is one real process from start to exit (the best of
{args.repeat}), measured by `.venv/bin/python benchmarks/cli_errors.py --repeat {args.repeat}` on {date.today()}
({machine}, no GPU), against a tiny diffusers-written base and a LoRA trained on it. Most of
the time is imports: torch about 2 s, open_clip and Hydra about 1 s.

| mistake | reported after | the line (stderr) |
|---|---|---|
{table}

Each error is one `Error: ...` line on stderr, also written to the run's log file, and the exit
status is 1. `tests/test_cli_errors.py` and `tests/test_cli_bad_input.py` cover the cases.
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
