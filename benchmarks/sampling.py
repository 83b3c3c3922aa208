"""Sampling: seconds for one image by 50 DDIM steps with guidance, ours against diffusers'
``StableDiffusionPipeline`` with the same U-Net and VAE weights and the same starting noise.

    python benchmarks/sampling.py                      # SD 1.5 U-Net + SD VAE, 512 px, on the GPU
    python benchmarks/sampling.py --unet tiny --vae tiny --px 64 --device cpu --steps 5

Ours is ``diffusion.guidance.generate`` (what ``stage=sample`` and the validation grids run):
under bf16 autocast with float32 weights (as ``stage=sample`` runs today), and with bf16
weights. Diffusers runs with bf16 weights (``pipe.to(torch.bfloat16)``), its ``DDIMScheduler``
in SD's settings, and the prompt embeddings passed in (no text encoder on either side: both get
the same random 77-token states). The images of both are compared.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    device_info,
    diffusers_unet,
    diffusers_vae,
    md_table,
    nonzero,
    sync,
    unet_preset,
    vae_preset,
    write_result,
)

from sd_lightning.diffusion.guidance import generate, initial_noise  # noqa: E402
from sd_lightning.diffusion.schedules import make_alphas_cumprod  # noqa: E402
from sd_lightning.weights.schedule import SD_SCHEDULER  # noqa: E402

SD_LATENT_SCALE = 0.18215


def timed(fn, device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--unet", default="sd15")
    p.add_argument("--vae", default="sd")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        unet = unet_preset(args.unet).eval()
        vae = vae_preset(args.vae, args.px).eval()
    nonzero(unet)
    theirs_unet = diffusers_unet(unet, args.px // vae.downsample_factor).eval()
    theirs_vae = diffusers_vae(vae).eval()
    dim = unet.config["context_dim"]
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, dim, generator=g).to(device)
    uncond = torch.randn(1, 77, dim, generator=g).to(device) * 0.5
    latent_shape = (unet.config["in_channels"], *(2 * [args.px // vae.downsample_factor]))
    abar = make_alphas_cumprod()
    amp = device.type == "cuda"

    def ours(net, decoder):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return generate(
                    unet=net,
                    decode=lambda z: decoder.decode(z / SD_LATENT_SCALE),
                    encode_text=lambda caps: cond if caps[0] else uncond,
                    prompts=["a prompt"],
                    seeds=[0],
                    abar=abar,
                    prediction="epsilon",
                    latent_shape=latent_shape,
                    sampler="ddim",
                    steps=args.steps,
                    guidance=args.guidance,
                    device=device,
                )

        return run

    dtype = torch.bfloat16 if amp else torch.float32
    unet_lp = copy.deepcopy(unet).to(dtype)
    vae_lp = copy.deepcopy(vae).to(dtype)
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER)
    theirs_vae.config.scaling_factor = SD_LATENT_SCALE
    pipe = diffusers.StableDiffusionPipeline(
        vae=theirs_vae,
        text_encoder=None,
        tokenizer=None,
        unet=theirs_unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise([0], latent_shape, device, torch.float32)

    def theirs():
        with torch.no_grad():
            image = pipe(
                prompt_embeds=cond.to(dtype),
                negative_prompt_embeds=uncond.to(dtype),
                latents=noise.to(dtype),
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                output_type="pt",
                return_dict=False,
            )[0]
        return image.float() * 2 - 1  # diffusers' "pt" images are in [0, 1]

    runs = {
        f"ours: stage=sample today (float32 weights{', bf16 autocast' if amp else ''})": ours(
            unet, vae
        ),
        f"ours: {str(dtype).split('.')[-1]} weights": ours(unet_lp, vae_lp),
        f"diffusers StableDiffusionPipeline, {str(dtype).split('.')[-1]} weights": theirs,
    }
    images, seconds = {}, {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up (kernels, cuDNN plans)
        images[name] = fn().cpu()
    for _ in range(args.rounds):
        for name, fn in runs.items():
            sec, _ = timed(fn, device)
            seconds[name].append(sec)
    reference = images[list(runs)[-1]]
    rows = []
    for name in runs:
        best = min(seconds[name])
        diff = float((images[name] - reference).norm() / reference.norm())
        rows.append([name, best, min(seconds[list(runs)[-1]]) / best, diff])
    result = {
        "what": "sampling",
        "unet": args.unet,
        "px": args.px,
        "steps": args.steps,
        "guidance": args.guidance,
        "rows": rows,
        "device": device_info(device),
    }
    write_result(args.json, result)
    print(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    rows = [[name, sec, f"{speed:.2f}x", f"{diff:.1e}"] for name, sec, speed, diff in r["rows"]]
    header = [
        f"{r['unet']} + VAE decoder, {r['px']} px, {r['steps']} DDIM steps, guidance {r['guidance']}",
        "s/image",
        "speed vs diffusers",
        "image rel. diff vs diffusers",
    ]
    return md_table(header, rows)


if __name__ == "__main__":
    main()
