"""The cost of representation alignment in a training step: the same U-Net, batch and loss,
plain, with U-REPA running DINOv2 on the batch's images (``repa=urepa``), with the features
precomputed into the latent shards (``stage=encode repa=urepa``), and REPA-E's whole step
(``stage=e2e``: the VAE's step through the frozen U-Net's middle block with L1 + LPIPS + KL +
PatchGAN, the discriminator's, then the U-Net's on the detached latents). DINOv2 ViT-B/14's and
SD's VAE's architectures with random weights (the cost does not depend on them); the plain and
U-REPA steps take stored latents, REPA-E's encodes the images.

    python benchmarks/repa_step.py                                 # SD 1.5 at 256 px on the GPU
    python benchmarks/repa_step.py --unet tiny --vae tiny --px 64 --batch 2 --dino tiny --device cpu

Steps are timed interleaved (median of rounds) after warm-up; on a GPU also the step's peak
memory with the weights and optimizer state.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    device_info,
    interleaved,
    md_table,
    optimizer_bytes,
    step_memory,
    tensor_bytes,
    unet_preset,
    vae_preset,
    write_result,
)

from sd_lightning.losses import AutoencoderLoss, build_lpips  # noqa: E402
from sd_lightning.models import NLayerDiscriminator  # noqa: E402
from sd_lightning.models.alignment import UNetAlignment, alignment_loss  # noqa: E402
from sd_lightning.models.latent_norm import LatentNorm  # noqa: E402
from sd_lightning.weights.vision import VisionEncoder  # noqa: E402

DINO = {  # facebook/dinov2-base's config.json
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=14,
        image_size=518,
        mlp_ratio=4,
        layerscale_value=1.0,
    ),
    "tiny": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        patch_size=14,
        image_size=56,
        mlp_ratio=3,
        layerscale_value=1.0,
    ),
}


def make_steps(args, device: torch.device) -> tuple[dict[str, Any], dict[str, int]]:
    torch.manual_seed(0)
    unet = unet_preset(args.unet).to(device).train()
    config = unet.config
    encoder = VisionEncoder("random", args.resolution, DINO[args.dino]).to(device)
    head = UNetAlignment(config["model_channels"] * config["channel_mult"][-1], encoder.dim).to(
        device
    )
    opt_plain = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    opt_repa = torch.optim.AdamW([*unet.parameters(), *head.parameters()], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    side = args.px // 8
    x = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    images = (torch.rand(args.batch, 3, args.px, args.px, generator=g) * 2 - 1).to(device)
    ctx = torch.randn(args.batch, 77, config["context_dim"], generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    stored = encoder(images)  # what stage=encode wrote
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def step(opt, features=None, online=False):
        caught = []
        handle = unet.middle_block.register_forward_hook(lambda m, a, out: caught.append(out))
        try:
            with autocast:
                loss = F.mse_loss(unet(x, t, ctx).float(), target)
                if features is not None or online:
                    goal = encoder(images) if online else features
                    loss = loss + 0.5 * alignment_loss(head(caught[-1], encoder.grid), goal.float())
        finally:
            handle.remove()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    e2e_step, e2e_resident = make_e2e_step(args, device, unet, head, encoder, images, ctx, t)
    steps = {
        "plain stage 2": lambda: step(opt_plain),
        "U-REPA, DINOv2 on the batch's images": lambda: step(opt_repa, online=True),
        "U-REPA, features precomputed (stage=encode)": lambda: step(opt_repa, features=stored),
        E2E: e2e_step,
    }
    for fn in steps.values():  # warm-up, and the optimizer state exists
        fn()
    weights = tensor_bytes(unet.parameters())
    resident = {
        "plain stage 2": weights + optimizer_bytes(opt_plain),
        "U-REPA, DINOv2 on the batch's images": weights
        + tensor_bytes(head.parameters())
        + tensor_bytes(encoder.parameters())
        + optimizer_bytes(opt_repa),
        "U-REPA, features precomputed (stage=encode)": weights
        + tensor_bytes(head.parameters())
        + optimizer_bytes(opt_repa),
        E2E: e2e_resident(),
    }
    return steps, resident


E2E = "REPA-E (stage=e2e): VAE, discriminator and U-Net steps"


def make_e2e_step(args, device, unet, head, encoder, images, ctx, t):
    """REPA-E's step as ``systems/e2e.py`` takes it, on bare networks; and its resident bytes."""
    vae = vae_preset(args.vae, args.px).to(device).train()
    disc = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3, norm="batch")
    lpips = build_lpips(trunk="random")
    loss_fn = AutoencoderLoss(disc, lpips, disc_start=0, disc_weight=0.1, adaptive=False)
    loss_fn = loss_fn.to(device)
    norm = LatentNorm(vae.embed_dim).to(device)
    opts = [
        torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0),
        torch.optim.AdamW(disc.parameters(), lr=1e-4, weight_decay=0.0),
        torch.optim.AdamW([*unet.parameters(), *head.parameters()], lr=1e-4, weight_decay=0.0),
    ]
    abar = torch.linspace(0.99, 0.01, 1000, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def noised(z, noise):
        a = abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * z + (1 - a).sqrt() * noise

    def e2e_step():
        goal = encoder(images).float()
        with autocast:
            posterior = vae.encode(images)
            z = posterior.sample().float()
            recon = vae.decode(z)
        noise = torch.randn_like(z)
        unet.requires_grad_(False), head.requires_grad_(False), unet.eval(), norm.eval()
        with autocast:
            g_loss, _ = loss_fn.generator_loss(images, recon, posterior, 0)
            middle = unet.middle_features(noised(norm(z), noise), t, ctx)
            align = alignment_loss(head(middle, encoder.grid).float(), goal)
        (g_loss + 1.5 * align).backward()
        opts[0].step(), opts[0].zero_grad(set_to_none=True)
        with autocast:
            d_loss, _ = loss_fn.discriminator_loss(images, recon.detach(), 0)
        d_loss.backward()
        opts[1].step(), opts[1].zero_grad(set_to_none=True)
        unet.requires_grad_(True), head.requires_grad_(True), unet.train(), norm.train()
        caught = []
        handle = unet.middle_block.register_forward_hook(lambda m, a, out: caught.append(out))
        try:
            with autocast:
                zn = norm(z.detach())
                loss = F.mse_loss(unet(noised(zn, noise), t, ctx).float(), noise)
                loss = loss + 0.5 * alignment_loss(head(caught[-1], encoder.grid).float(), goal)
        finally:
            handle.remove()
        loss.backward()
        opts[2].step(), opts[2].zero_grad(set_to_none=True)

    def resident() -> int:
        nets = [unet, head, encoder, vae, disc, lpips]
        return sum(tensor_bytes(n.parameters()) for n in nets) + sum(map(optimizer_bytes, opts))

    return e2e_step, resident


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--unet", default="sd15")
    p.add_argument("--vae", default="sd", help="REPA-E's VAE preset (conf/vae/)")
    p.add_argument("--px", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dino", default="base", choices=sorted(DINO))
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    steps, resident = make_steps(args, device)
    seconds = interleaved(steps, args.steps, args.rounds, device)
    plain = seconds["plain stage 2"]
    rows = []
    for name, fn in steps.items():
        peak = step_memory(fn, resident[name], device)
        rows.append(
            [name, 1000 * seconds[name], seconds[name] / plain, peak / 2**30 if peak else None]
        )
    result = {
        "what": "repa_step",
        "unet": args.unet,
        "px": args.px,
        "batch": args.batch,
        "dino": args.dino,
        "vae": args.vae,
        "resolution": args.resolution,
        "rows": rows,
        "device": device_info(device),
    }
    write_result(args.json, result)
    print(markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    header = [
        f"U-Net {r['unet']}, {r['px']} px, batch {r['batch']}; DINOv2 {r['dino']} at "
        f"{r['resolution']} px; VAE {r.get('vae', 'sd')}",
        "ms / step",
        "time vs plain",
        "peak GiB",
    ]
    rows = [[n, ms, f"{x:.2f}x", gib] for n, ms, x, gib in r["rows"]]
    return md_table(header, rows)


if __name__ == "__main__":
    main()
