"""``stage=eval``'s throughput: images per second of each of its stages on one device, and the
hours of an SD-size evaluation (COCO 30k, 8 guidance values) they add up to.

    python benchmarks/eval_speed.py                              # SD 1.5 at 512 px on the GPU
    python benchmarks/eval_speed.py --unet tiny --vae tiny --px 64 --steps 2 --batch 4 --clip none

Generation is ``diffusion.guidance.generate`` with bf16 weights (what ``stage=eval`` runs on a
GPU), DDIM with guidance; features are ``InceptionFeatures`` (random weights in the classic
file's layout: the same network and cost) in each resize protocol, against torchmetrics' FID
update (torch-fidelity's network, legacy resize) measured in the same run; CLIP score is
``ClipScorer`` with a random OpenCLIP ViT-L/14 (the default's architecture).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_info, md_table, nonzero, sync, unet_preset, vae_preset, write_result  # noqa: E402

from sd_lightning.diffusion.guidance import generate  # noqa: E402
from sd_lightning.diffusion.schedules import make_alphas_cumprod  # noqa: E402
from sd_lightning.evaluation.inception import RESIZES, InceptionFeatures  # noqa: E402


def rate(fn, count: int, device: torch.device, rounds: int) -> float:
    """Images per second of ``fn`` (``count`` images a call), best of ``rounds`` after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--unet", default="sd15")
    p.add_argument("--vae", default="sd")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--clip", default="ViT-L-14", help="an OpenCLIP name, or none")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    rows: list[list[Any]] = []
    torch.manual_seed(0)
    with torch.device(device):
        unet = unet_preset(args.unet).eval()
        vae = vae_preset(args.vae, args.px).eval()
    nonzero(unet)
    unet.to(dtype)
    vae.to(dtype)
    dim = unet.config["context_dim"]
    cond = torch.randn(1, 77, dim, device=device, dtype=dtype)
    latent = (unet.config["in_channels"], *(2 * [args.px // vae.downsample_factor]))
    abar = make_alphas_cumprod()
    images = torch.randint(0, 256, (args.batch, 3, args.px, args.px), dtype=torch.uint8)

    def generation():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu), torch.no_grad():
            return generate(
                unet=unet,
                decode=lambda z: vae.decode(z / 0.18215),
                encode_text=lambda caps: cond.expand(len(caps), -1, -1),
                prompts=["a prompt"] * args.batch,
                seeds=list(range(args.batch)),
                abar=abar,
                prediction="epsilon",
                latent_shape=latent,
                sampler="ddim",
                steps=args.steps,
                guidance=7.5,
                device=device,
                batch_size=args.batch,
            )

    rows.append(
        [
            f"generation: {args.unet}, {args.steps} DDIM steps, guidance 7.5, batch {args.batch}",
            rate(generation, args.batch, device, args.rounds),
        ]
    )
    for resize in RESIZES:
        net = InceptionFeatures("random", 2048, resize).to(device)
        rows.append(
            [
                f"Inception features ({resize} resize)",
                rate(lambda net=net: net(images), args.batch, device, args.rounds),
            ]
        )
    rows.append(
        [
            "torchmetrics FID update (reference: legacy resize)",
            _torchmetrics_rate(images, device, args.rounds),
        ]
    )
    if args.clip != "none":
        from sd_lightning.evaluation.clip_score import ClipScorer

        scorer = ClipScorer(args.clip, "random").to(device)
        captions = ["a photograph of an astronaut riding a horse"] * args.batch
        rows.append(
            [
                f"CLIP score (OpenCLIP {args.clip})",
                rate(lambda: scorer(images, captions), args.batch, device, args.rounds),
            ]
        )
    parts = ("generation", "Inception features (clean", "CLIP score")  # what stage=eval runs
    per_image = sum(1 / r for name, r in rows if name.startswith(parts))
    result = {
        "what": "eval_speed",
        "unet": args.unet,
        "px": args.px,
        "steps": args.steps,
        "batch": args.batch,
        "rows": rows,
        "images_per_s": 1 / per_image,
        "hours_coco30k_8_guidance": 30000 * 8 * per_image / 3600,
        "device": device_info(device),
    }
    write_result(args.json, result)
    print(markdown(result))
    return result


def _torchmetrics_rate(images: torch.Tensor, device: torch.device, rounds: int) -> float:
    """torchmetrics' FID update with a random trunk written in the classic file's layout."""
    import tempfile

    from torchmetrics.image.fid import FrechetInceptionDistance

    from sd_lightning.evaluation.inception import random_state

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "inception.pth")
        torch.save(random_state(), path)
        metric = FrechetInceptionDistance(feature_extractor_weights_path=path, antialias=False).to(
            device
        )
    return rate(lambda: metric.update(images.to(device), real=False), len(images), device, rounds)


def markdown(r: dict[str, Any]) -> str:
    table = md_table([f"stage=eval's work at {r['px']} px, one device", "images/s"], r["rows"])
    return (
        f"{table}\n\nstage=eval (generation, clean-resize features, CLIP score): "
        f"{r['images_per_s']:.2f} images/s per device; COCO-30k at 8 guidance values: "
        f"{r['hours_coco30k_8_guidance']:.1f} device-hours."
    )


if __name__ == "__main__":
    main()
