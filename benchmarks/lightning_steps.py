"""Training steps as users run them: ``train(cfg)`` with Lightning, the loaders, EMA and logging.

    python benchmarks/lightning_steps.py ldm --unet sd15 --px 512 --batch 32   # stage 2
    python benchmarks/lightning_steps.py vae --vae sd --px 256 --batch 8       # stage 1

``ldm``: stage 2 on precomputed-latent shards (``data=latents``, written here with random
latents and text states) through the real config, ``trainer=gpu`` (or ``cpu``) and the default
callbacks (progress bar, NaN guard, preemption, ``logger=csv``; periodic checkpoints off). A
callback times the steps after warm-up; then, in the same process on the same U-Net, optimizer
and batch size, the bare step (forward, backward, AdamW) alone, with the EMA update, and with
gradient clipping too. The difference is what Lightning, the loader and logging cost.

``vae``: stage 1 (autoencoder + LPIPS + PatchGAN, the discriminator on from step 0) on generated
image shards: images/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_info, interleaved, load_preset, md_table, vae_preset, write_result  # noqa: E402

from sd_lightning.commands.open import save_vae  # noqa: E402
from sd_lightning.commands.train import train  # noqa: E402
from sd_lightning.core.config import compose_config  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of the training steps ``warmup + 1 .. warmup + steps`` (synchronised at both
    ends), the host's wait for each batch, and, at the end of training, the bare steps on the
    same U-Net (``bare_steps``: stage 2)."""

    def __init__(self, warmup: int, steps: int, bare_steps: int = 0, result: str | None = None):
        self.warmup, self.steps, self.bare_steps, self.result = warmup, steps, bare_steps, result
        self.t0 = self.t1 = None
        self.batch_end: float | None = None
        self.waits: list[float] = []
        self.figures: dict[str, Any] = {}

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes = {k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)}
        if self.batch_end is not None and self.t0 is not None and self.t1 is None:
            self.waits.append(time.perf_counter() - self.batch_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
        elif step == self.warmup + self.steps and self.t1 is None:
            self._sync(pl_module)
            self.t1 = time.perf_counter()
        self.batch_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"StepTimer: training ended before step {self.warmup + self.steps}")
        self.figures["s_per_step"] = (self.t1 - self.t0) / self.steps
        self.figures["host_wait_ms"] = 1e3 * statistics.mean(self.waits) if self.waits else 0.0
        if pl_module.device.type == "cuda":
            self.figures["peak_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        if self.bare_steps:
            with torch.enable_grad():
                self.figures["bare"] = bare_steps(trainer, pl_module, self.shapes, self.bare_steps)
        if self.result:
            with open(self.result, "w") as f:
                json.dump(self.figures, f)


def bare_steps(trainer, system, shapes: dict[str, tuple], n: int) -> dict[str, float]:
    """Seconds per step of the U-Net step without Lightning, on batches of the run's shapes:
    forward + loss + backward + AdamW (the run's own optimizer), then with the EMA update, then
    with gradient clipping too."""
    unet, opt, device = system.unet, trainer.optimizers[0], system.device
    b, c, h, w = shapes["latent_mean"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, c, h, w, generator=g).to(device)
    ctx = torch.randn(*shapes["text_states"], generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    target = torch.randn(b, c, h, w, generator=g).to(device)
    amp = trainer.precision.startswith("bf16")
    clip = trainer.gradient_clip_val

    def make(ema: bool, clipping: bool):
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = unet(z, t, ctx)
            F.mse_loss(out.float(), target).backward()
            if clipping and clip:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema and system.ema is not None:
                system.ema.update(unet)

        return step

    steps = {"bare": make(False, False), "ema": make(True, False), "ema_clip": make(True, True)}
    for step in steps.values():
        step()
    return interleaved(steps, n, 2, device)


def timed_run(args, result_path: str, bare_steps: int = 0) -> list[str]:
    """The overrides both stages share: the trainer, warm-up + timed steps, no validation and no
    periodic checkpoints, CSV logging, the user's ``--override``s, and the :class:`StepTimer`."""
    return [
        f"trainer={args.trainer}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "logger=csv",
        "callbacks.model_checkpoint=null",
        *args.override,
        "+callbacks.step_timer._target_=__main__.StepTimer",
        f"+callbacks.step_timer.warmup={args.warmup}",
        f"+callbacks.step_timer.steps={args.steps}",
        f"+callbacks.step_timer.bare_steps={bare_steps}",
        f"+callbacks.step_timer.result={result_path}",
    ]


# -- stage 2 -------------------------------------------------------------------------------------
def write_latent_shards(folder: str, shards: int, per_shard: int, latent: int, dim: int) -> str:
    from sd_lightning.data.latents import npy_bytes
    from sd_lightning.data.writer import ShardWriter

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    writer = ShardWriter(folder, samples_per_shard=per_shard)
    for i in range(shards * per_shard):
        writer.write(
            {
                "mean.npy": npy_bytes(rng.standard_normal((4, latent, latent)).astype(np.float16)),
                "logvar.npy": npy_bytes(np.full((4, latent, latent), -6, np.float16)),
                "text.npy": npy_bytes(rng.standard_normal((77, dim)).astype(np.float16) * 0.5),
                "txt": f"a photo number {i}".encode(),
            }
        )
    writer.finish()
    return os.path.join(folder, f"{{000000..{shards - 1:06d}}}.tar")


def text_overrides(dim: int) -> list[str]:
    """A two-block random text tower (the penultimate: one block runs) of the U-Net's context width (with precomputed text states
    it runs only on dropped captions)."""
    heads = max(1, dim // 64)
    return [
        f"text_encoder.random_text_cfg.width={dim}",
        f"text_encoder.random_text_cfg.output_dim={dim}",
        f"text_encoder.random_text_cfg.heads={heads}",
        "text_encoder.random_text_cfg.layers=2",
    ]


def run_ldm(args, tmp: str, device: torch.device) -> dict[str, Any]:

    dim = int(load_preset("unet", args.unet).context_dim)
    autoencoder = vae_preset(args.vae, args.px)
    latent = args.px // autoencoder.downsample_factor
    urls = write_latent_shards(os.path.join(tmp, "latents"), 5, args.batch * 2, latent, dim)
    vae = save_vae(autoencoder, os.path.join(tmp, "vae.safetensors"))
    result_path = os.path.join(tmp, "steps.json")
    overrides = [
        "stage=ldm",
        f"unet={args.unet}",
        "data=latents",
        f"data.urls='{urls}'",
        f"data.image_size={args.px}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.samples_per_epoch={args.batch * 1000}",
        "data.shuffle_buffer=16",
        f"vae_ckpt={vae}",
        "model.val_prompts=[]",
        *text_overrides(dim),
        *timed_run(args, result_path, bare_steps=args.steps),
    ]
    cfg = compose_config(overrides, os.path.join(tmp, "run"))
    train(cfg)
    with open(result_path) as f:
        figures = json.load(f)
    sec, bare = figures["s_per_step"], figures["bare"]
    rows = [
        ["bare U-Net step (forward, backward, AdamW)", bare["bare"]],
        ["+ EMA update (torch._foreach_lerp_)", bare["ema"]],
        [f"+ gradient clipping ({cfg.trainer.gradient_clip_val})", bare["ema_clip"]],
        ["train(): Lightning, latent loader, EMA, clipping, NaN guard, logging", sec],
    ]
    for row in rows:
        row += [
            1e3 * row[1],
            args.batch / row[1],
            f"{100 * (row[1] / bare['ema_clip'] - 1):+.1f} %",
        ]
    return {
        "what": "ldm",
        "unet": args.unet,
        "px": args.px,
        "batch": args.batch,
        "rows": [[r[0], r[2], r[3], r[4]] for r in rows],
        "overhead_vs_bare_pct": 100 * (sec / bare["bare"] - 1),
        "overhead_vs_same_work_pct": 100 * (sec / bare["ema_clip"] - 1),
        "host_wait_ms": figures["host_wait_ms"],
        "peak_gib": figures.get("peak_gib"),
    }


def ldm_markdown(r: dict[str, Any]) -> str:
    table = md_table(["step", "ms/step", "images/s", "vs the same work bare"], r["rows"])
    return (
        f"{table}\n\nStage 2, {r['unet']} at {r['px']} px, batch {r['batch']}: `train()` costs "
        f"{r['overhead_vs_same_work_pct']:+.1f} % over the bare step doing the same work (EMA and "
        f"clipping included), {r['overhead_vs_bare_pct']:+.1f} % over the bare forward, backward "
        f"and AdamW; the host waited {r['host_wait_ms']:.2f} ms per batch between steps "
        f"(loader and Lightning); peak memory {r['peak_gib'] or 0:.1f} GiB."
    )


# -- stage 1 -------------------------------------------------------------------------------------
def run_vae(args, tmp: str, device: torch.device) -> dict[str, Any]:
    result_path = os.path.join(tmp, "steps.json")
    overrides = [
        "stage=vae",
        f"vae={args.vae}",
        f"paths.data_dir={os.path.join(tmp, 'data')}",
        f"data.image_size={args.px}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.demo.image_size={args.px}",
        "data.demo.train_shards=2",
        "data.demo.val_shards=1",
        f"data.demo.samples_per_shard={max(16, args.batch * 2)}",
        f"data.samples_per_epoch={args.batch * 1000}",
        "loss.disc_start=0",
        "loss.perceptual.trunk=random",
        *timed_run(args, result_path),
    ]
    train(compose_config(overrides, os.path.join(tmp, "run")))
    with open(result_path) as f:
        figures = json.load(f)
    return {
        "what": "vae",
        "vae": args.vae,
        "px": args.px,
        "batch": args.batch,
        "ms_per_step": 1e3 * figures["s_per_step"],
        "images_per_s": args.batch / figures["s_per_step"],
        "peak_gib": figures.get("peak_gib"),
        "host_wait_ms": figures["host_wait_ms"],
    }


def vae_markdown(r: dict[str, Any]) -> str:
    return md_table(
        ["stage 1", "px", "batch", "ms/step", "images/s", "peak GiB", "host wait ms/batch"],
        [
            [
                f"vae={r['vae']}: autoencoder + LPIPS + PatchGAN (both optimizers)",
                r["px"],
                r["batch"],
                r["ms_per_step"],
                r["images_per_s"],
                r["peak_gib"],
                r["host_wait_ms"],
            ]
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("what", choices=["ldm", "vae"])
    p.add_argument("--unet", default="sd15")
    p.add_argument("--vae", default="sd")
    p.add_argument("--px", type=int, default=None, help="image size (ldm: 512, vae: 256)")
    p.add_argument("--batch", type=int, default=None, help="ldm: 32, vae: 8")
    p.add_argument("--trainer", default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--override", action="append", default=[], help="more config overrides")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.px = args.px or (512 if args.what == "ldm" else 256)
    args.batch = args.batch or (32 if args.what == "ldm" else 8)
    device = torch.device("cuda" if args.trainer != "cpu" and torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_ldm(args, tmp, device) if args.what == "ldm" else run_vae(args, tmp, device)
    result["device"] = device_info(device)
    write_result(args.json, result)
    print(ldm_markdown(result) if args.what == "ldm" else vae_markdown(result))
    return result


if __name__ == "__main__":
    main()
