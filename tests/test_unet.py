"""The U-Net, the text encoder and EMA as plain PyTorch; parameter names checked against diffusers'
own single-file converters (diffusers is a test-only dependency)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sd_lightning.conditioning import OpenCLIPTextEncoder
from sd_lightning.models import EMA, AutoencoderKL, UNetModel
from sd_lightning.weights.configs import unet_diffusers_config, vae_diffusers_config
from sd_lightning.weights.layouts import to_original


def _preset(name: str, **overrides) -> UNetModel:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "unet" / f"{name}.yaml"), overrides)
    if "defaults" in cfg:  # sd2 extends sd15
        base = OmegaConf.load(CONF / "unet" / "sd15.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return instantiate(cfg)


@pytest.mark.parametrize(
    ("preset", "count"),
    [("sd15", 859_520_964), ("sd2", 865_910_724)],  # the released SD 1.5 / SD 2.1 U-Nets
)
def test_sd_presets_have_the_reference_parameter_counts(preset, count):
    with torch.device("meta"):
        unet = _preset(preset)
    assert sum(p.numel() for p in unet.parameters()) == count


def _small_unet(**kw) -> UNetModel:
    base = dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=-1,
        num_head_channels=16,
        context_dim=24,
        norm_groups=8,
    )
    return UNetModel(**{**base, **kw})


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised output layers would hide mistakes: give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("linear", [False, True])
def test_unet_matches_diffusers_after_diffusers_own_single_file_conversion(linear):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = _small_unet(use_linear_in_transformer=linear).eval()
    _randomize(ours)
    config = unet_diffusers_config(ours.config, sample_size=8)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint(to_original(ours.state_dict(), "unet"), config)
    missing, unexpected = theirs.load_state_dict(converted, strict=True)
    assert not missing and not unexpected

    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_vae_matches_diffusers_after_diffusers_own_single_file_conversion():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_groups=8)
    _randomize(ours.eval(), seed=1)
    config = vae_diffusers_config(ours.config)
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(
        convert_ldm_vae_checkpoint(to_original(ours.state_dict(), "vae"), config)
    )
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=1e-4, rtol=1e-4
        )
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    plain = _small_unet()
    _randomize(plain)
    ckpt = _small_unet(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 3, 24)
    outs = []
    for net in (plain, ckpt):
        net.zero_grad()
        out = net(x, t, ctx)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unet_rejects_bad_configs_with_the_fix():
    with pytest.raises(ValueError, match="exactly one of unet.num_heads"):
        UNetModel(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="attention_levels"):
        _small_unet(attention_levels=(3,))
    with pytest.raises(ValueError, match="not divisible"):
        _small_unet()(torch.randn(1, 4, 7, 7), torch.tensor([1]), torch.randn(1, 3, 24))


def test_ema_tracks_with_warmup_and_stays_out_of_the_optimizer():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, decay=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    before = ema.net.weight.clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    decay = ema.current_decay()  # (1 + 0) / (10 + 0) = 0.1 at the first update
    ema.update(net)
    torch.testing.assert_close(ema.net.weight, decay * before + (1 - decay) * net.weight)
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.net.weight, net.weight, atol=1e-6, rtol=0)
    assert int(ema.num_updates) == 201


def test_ema_warmup_follows_a_loaded_count():
    """The update count is kept on the host (no GPU synchronisation per step) and re-read from
    the buffer when a checkpoint is loaded."""
    ema = EMA(torch.nn.Linear(3, 3), decay=0.9999)
    ema.update(ema.net)
    assert ema.current_decay() == 2 / 11
    state = ema.state_dict()
    state["num_updates"] = torch.tensor(40)
    ema.load_state_dict(state)
    assert ema.current_decay() == 41 / 50
    ema.num_updates.fill_(90)  # copied in place (as a sharded checkpoint load may do)
    ema.resync()
    assert ema.current_decay() == 91 / 100


def _random_text_encoder(**kw) -> OpenCLIPTextEncoder:
    cfg = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2, output_dim=32)
    return OpenCLIPTextEncoder(random_text_cfg=cfg, **kw)


def test_text_encoder_penultimate_layer_is_seeded_and_frozen(caplog):
    with caplog.at_level("WARNING"):
        a = _random_text_encoder(seed=3)
    assert "RANDOM-initialised" in caplog.text
    b = _random_text_encoder(seed=3)
    last = _random_text_encoder(seed=3, layer="last")
    prompts = ["a red circle", "a blue square"]
    sa, sb, sl = a(prompts), b(prompts), last(prompts)
    assert sa.shape == (2, 16, 32) and not sa.requires_grad
    torch.testing.assert_close(sa, sb)  # same seed, same tower in every process
    assert not torch.allclose(sa, sl)  # penultimate is not the last layer
    assert not torch.allclose(sa[0], sa[1])  # prompts are told apart
    assert not any(p.requires_grad for p in a.parameters())
    # the penultimate states are the last block's input: running it reproduces layer="last"
    tower = a.tower
    tokens = a.tokenizer(prompts)
    x = tower.token_embedding(tokens) + tower.positional_embedding
    for block in tower.transformer.resblocks:
        x = block(x, attn_mask=tower.attn_mask)
    torch.testing.assert_close(sl, tower.ln_final(x).detach())


def test_text_encoder_weights_that_cannot_be_had_give_the_fix(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(ValueError, match="no such file"):
        OpenCLIPTextEncoder(name="ViT-H-14", pretrained=str(missing))
    with pytest.raises(ValueError, match="text_encoder=random_tiny"):
        OpenCLIPTextEncoder(name="ViT-H-14", pretrained=None)
    with pytest.raises(ValueError, match="layer"):
        _random_text_encoder(layer="second")


def test_unet_blocks_are_units_fsdp2_accepts_in_every_supported_torch():
    """torch < 2.14's ``fully_shard`` refuses any ``nn.ModuleList``/``ModuleDict``, even one with a
    forward (seen on torch 2.11 on the GPU machine): the blocks it shards must be neither."""
    from sd_lightning.models.parallel import unet_blocks

    unet = _small_unet()
    blocks = unet_blocks(unet)
    assert blocks and not any(
        isinstance(b, (torch.nn.ModuleList, torch.nn.ModuleDict)) for b in blocks
    )
    # and the names stay the single-file layout: input_blocks.<i>.<j>...
    assert "input_blocks.1.0.in_layers.0.weight" in unet.state_dict()


def test_compile_scope_is_checked_and_model_scope_compiles_in_place():
    from sd_lightning.models.parallel import compile_unet

    unet = _small_unet()
    with pytest.raises(ValueError, match=r"model.compile_scope='block': choose one of"):
        compile_unet(unet, "block")
    names = list(unet.state_dict())
    compile_unet(unet, "model")  # lazy: nothing compiles until the first call
    assert list(unet.state_dict()) == names and unet._compiled_call_impl is not None


def test_speed_options_keep_the_function():
    """channels_last and the norms' output dtype change speed and memory, not the function:
    the same outputs in float32, and under bf16 autocast the norms hand on bf16 (with
    fp32_norms, what autocast chooses: float32 on CUDA)."""
    ref = _small_unet().eval()
    _randomize(ref)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    fast = _small_unet(channels_last=True).eval()
    fast.load_state_dict(ref.state_dict())
    assert (
        fast.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    )
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, ctx), ref(x, t, ctx), atol=1e-5, rtol=1e-4)
    norm = ref.input_blocks[1][0].in_layers[0]
    plain = torch.nn.GroupNorm(norm.num_groups, norm.num_channels)
    h = torch.randn(2, 32, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(h).dtype == torch.bfloat16
        ref.set_fp32_norms(True)  # autocast's own choice (float32 on CUDA, bf16 on the CPU)
        assert norm(h).dtype == plain(h).dtype


def test_a_vector_condition_enters_through_label_emb_and_guidance_carries_it():
    """``adm_in_channels`` (SGM's; SDXL's pooled text and sizes, class labels): a vector added to
    the time embedding through ``label_emb.0.{0,2}``; samplers and guidance pass it on, the
    unconditional half with its own vector."""
    from sd_lightning.diffusion.conditions import Conditions
    from sd_lightning.diffusion.guidance import generate
    from sd_lightning.diffusion.schedules import make_alphas_cumprod

    torch.manual_seed(0)
    unet = _small_unet(adm_in_channels=6).eval()
    assert {"label_emb.0.0.weight", "label_emb.0.2.weight"} <= set(unet.state_dict())
    assert unet.config["adm_in_channels"] == 6 and "adm_in_channels" not in _small_unet().config
    for p in unet.parameters():  # zero-initialised outputs would hide the time embedding
        torch.nn.init.normal_(p, std=0.1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 24)
    y = torch.randn(2, 6)
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, ctx, y), unet(x, t, ctx, torch.zeros(2, 6)))
    with pytest.raises(ValueError, match="takes a vector condition y"):
        unet(x, t, ctx)
    vectors = {"a": torch.ones(6), "": torch.zeros(6)}

    def encode(prompts):
        return Conditions(
            torch.ones(len(prompts), 5, 24), torch.stack([vectors[p] for p in prompts])
        )

    def images(uncond_vector):
        vectors[""] = uncond_vector
        return generate(
            unet=unet,
            decode=lambda z: z[:, :3],
            encode_text=encode,
            prompts=["a"],
            seeds=[0],
            abar=make_alphas_cumprod(),
            prediction="epsilon",
            latent_shape=(4, 8, 8),
            steps=2,
            guidance=3.0,
        )

    assert not torch.allclose(images(torch.zeros(6)), images(torch.ones(6) * 3))
