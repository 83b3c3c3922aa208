"""The Stable Diffusion KL autoencoder (``AutoencoderKL``), plain PyTorch.

Layout and parameter names match CompVis's ``ldm.models.autoencoder.AutoencoderKL`` (what the
original single-file checkpoints store under ``first_stage_model.``). Size presets are Hydra configs
(``conf/vae/*.yaml``), not code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sd_lightning.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) over latent maps."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class _Level(nn.Module):
    """One resolution level: ResNet blocks, optional attention after each, optional resampler."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        cur_res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                cur_res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        cur_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                cur_res *= 2
            levels.insert(0, level)  # stored low-to-high index like the original: up[0] is full res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    Images are in [-1, 1]. The downsampling factor is ``2 ** (len(ch_mult) - 1)`` (8 for SD).
    ``scaling_factor``: what stage 2 multiplies this VAE's latents by, where it is known (SD's
    VAE: 0.18215); ``None`` lets stage 2 estimate it (``scale_by_std``).
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        z_channels: int = 4,
        embed_dim: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        resolution: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
        scaling_factor: float | None = None,
    ):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.config = {  # rebuilds this network: AutoencoderKL(**vae.config)
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "z_channels": z_channels,
            "embed_dim": embed_dim,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "resolution": resolution,
            "dropout": dropout,
            "norm_groups": norm_groups,
            "scaling_factor": scaling_factor,
        }
        self.scaling_factor = scaling_factor
        common = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            resolution=resolution,
            z_channels=z_channels,
            dropout=dropout,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(in_channels=in_channels, double_z=True, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: the adaptive GAN weight balances gradients here."""
        return self.decoder.conv_out.weight
