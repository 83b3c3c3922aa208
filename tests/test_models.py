"""The autoencoder and the discriminator: shapes, layout names, attention, posterior."""

from __future__ import annotations

import torch

from sd_lightning.models import AutoencoderKL, DiagonalGaussian, NLayerDiscriminator
from sd_lightning.models.layers import AttnBlock


def test_shapes_and_downsampling_factor():
    vae = AutoencoderKL(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=32, norm_groups=8)
    assert vae.downsample_factor == 8
    x = torch.randn(2, 3, 32, 32)
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 4, 4)
    assert vae.decode(post.sample()).shape == x.shape


def test_parameter_names_follow_the_original_layout():
    """The original single-file checkpoints store these under first_stage_model.* (identity map)."""
    keys = set(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=2, norm_groups=8).state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.norm2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.2.conv2.weight",
        "decoder.mid.block_2.norm1.bias",
        "decoder.norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in keys, key


def test_attention_matches_a_naive_softmax():
    torch.manual_seed(0)
    attn = AttnBlock(16, groups=4)
    x = torch.randn(2, 16, 5, 3)
    h = attn.norm(x)
    q, k, v = (m(h).flatten(2) for m in (attn.q, attn.k, attn.v))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 16**0.5, dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
    torch.testing.assert_close(attn(x), x + attn.proj_out(out), atol=1e-5, rtol=1e-5)


def test_posterior_kl_and_sampling():
    mean, logvar = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert post.kl().item() == 0.0  # N(0, I) against itself
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(post.sample(g1), post.sample(g2))
    shifted = DiagonalGaussian(torch.cat([mean + 1, logvar], 1))
    assert shifted.kl().item() == 0.5 * 16  # 0.5 * sum(mu^2)


def test_discriminator_scores_patches():
    d = NLayerDiscriminator(ndf=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
