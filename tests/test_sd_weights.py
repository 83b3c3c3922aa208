"""Stable Diffusion's weights in our networks: diffusers folders written by diffusers itself
(``save_pretrained``), original single files, standalone VAE files. Outputs are compared with
diffusers' own modules (the oracle, test-only), at tiny sizes with SD's layouts: four levels,
SD 1's 8 heads with attention at level 0 and two transformer layers, SD 2's linear projections
and 64-wide heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from sd_fixtures import HINT, UNETS, VAE, clip_model, pipeline_folder, randomize

from sd_lightning.commands.open import load_vae
from sd_lightning.core.errors import InputError
from sd_lightning.models import AutoencoderKL, UNetModel
from sd_lightning.weights import layouts
from sd_lightning.weights.configs import unet_diffusers_config, vae_diffusers_config
from sd_lightning.weights.layouts import to_original
from sd_lightning.weights.read import check_keys, read_sd_unet, read_sd_vae
from sd_lightning.weights.schedule import SD_SCHEDULER

diffusers = pytest.importorskip("diffusers")


def _unet_inputs(context: int):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 7, context, generator=g),
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_diffusers_unet_folder_gives_the_same_outputs(tmp_path, family):
    ours_cfg = {"in_channels": 4, "out_channels": 4, **UNETS[family]}
    theirs = randomize(diffusers.UNet2DConditionModel(**unet_diffusers_config(ours_cfg, 16)))
    theirs.save_pretrained(tmp_path / "pipe" / "unet")  # diffusers writes the folder
    part = read_sd_unet(str(tmp_path / "pipe"), "pretrained", HINT)
    assert part.family == family
    assert part.config == {**ours_cfg, "norm_groups": 32}
    ours = UNetModel(**part.config).eval()
    check_keys(ours, part.state, "test")
    ours.load_state_dict(part.state)
    x, t, ctx = _unet_inputs(UNETS[family]["context_dim"])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    # and back: our names -> diffusers' load into diffusers' model with nothing left over
    back, unknown = layouts.convert(ours.state_dict(), layouts.unet_blocks(ours.config), True)
    assert not unknown
    assert theirs.load_state_dict(back, strict=True)


@pytest.mark.parametrize("old_names", [False, True], ids=["current", "pre-0.14-names"])
def test_a_diffusers_vae_folder_works_as_vae_ckpt_with_the_family_scale(tmp_path, old_names):
    theirs = randomize(
        diffusers.AutoencoderKL(
            **vae_diffusers_config({**AutoencoderKL(**VAE).config, "resolution": 32})
        )
    )
    folder = tmp_path / "sd-vae-ft-mse"
    theirs.save_pretrained(folder, safe_serialization=not old_names)  # .bin for the old one
    if old_names:  # how diffusers before 0.14 named the attention
        path = folder / "diffusion_pytorch_model.bin"
        state = torch.load(path, weights_only=True)
        renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        for old, new in renames.items():
            state = {
                k.replace(f"attentions.0.{old}", f"attentions.0.{new}"): v for k, v in state.items()
            }
        torch.save(state, path)
    vae = load_vae(str(folder))
    assert vae.scaling_factor == pytest.approx(0.18215)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            vae.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-4
        )
        z = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(vae.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-4)


def _single_file(tmp_path, family: str, ema: bool) -> tuple:
    """An original single file (CompVis names, diffusers' converters read it) of random tiny
    SD-layout networks, with or without SD's ``model_ema.`` copy."""
    unet = randomize(UNetModel(**UNETS[family]), seed=1)
    vae = randomize(AutoencoderKL(**VAE), seed=2)
    state = {**to_original(unet.state_dict(), "unet"), **to_original(vae.state_dict(), "vae")}
    if ema:
        shadow = randomize(UNetModel(**UNETS[family]), seed=3)
        for name, value in shadow.state_dict().items():
            state["model_ema." + ("diffusion_model." + name).replace(".", "")] = value
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1000)
    path = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, unet, vae, shadow if ema else None


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_single_file_is_read_with_the_layout_its_weights_show(tmp_path, family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path, unet, vae, shadow = _single_file(tmp_path, family, ema=True)
    part = read_sd_unet(str(path), "ckpt", HINT)
    assert part.family == family and part.config == {**unet.config}
    ours = UNetModel(**part.config).eval()
    check_keys(ours, part.state, "test")
    ours.load_state_dict(part.state)
    # the oracle: diffusers' own converter reads the same file
    from safetensors.torch import load_file

    config = unet_diffusers_config(part.config, 16)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(load_file(path), config), strict=True)
    x, t, ctx = _unet_inputs(part.config["context_dim"])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample, atol=1e-5, rtol=1e-4
        )
    ema = read_sd_unet(str(path), "ckpt", HINT, use_ema=True)
    assert all(torch.equal(ema.state[k], v) for k, v in shadow.state_dict().items())
    sd_vae = read_sd_vae(str(path), "vae_ckpt", HINT)
    assert sd_vae.config == {**vae.config, "resolution": 512, "scaling_factor": 0.18215}
    assert all(torch.equal(sd_vae.state[k], v) for k, v in vae.state_dict().items())


def test_bad_sd_files_name_the_file_and_what_was_found(tmp_path):
    path, *_ = _single_file(tmp_path, "sd1", ema=False)
    with pytest.raises(InputError, match="has EMA weights for 0 of the U-Net's"):
        read_sd_unet(str(path), "ckpt", HINT, use_ema=True)
    vae_only = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in AutoencoderKL(**VAE).state_dict().items()}, vae_only)
    with pytest.raises(
        InputError, match=r"is a VAE, with no SD U-Net \(no model.diffusion_model.\* keys"
    ):
        read_sd_unet(str(vae_only), "pretrained", HINT)
    assert read_sd_vae(str(vae_only), "vae_ckpt", HINT).config["ch"] == 32  # a standalone VAE
    for context, match in (
        (4096, "4096-d text context: SD 1.x has 768, SD 2.x 1024, SDXL 2048"),
        (2048, "a 2048-d context but no vector condition .label_emb., which no SD family"),
    ):
        other = UNetModel(**{**UNETS["sd1"], "context_dim": context}).state_dict()
        save_file(
            {k: v.contiguous() for k, v in to_original(other, "unet").items()},
            tmp_path / "x.safetensors",
        )
        with pytest.raises(InputError, match=match):
            read_sd_unet(str(tmp_path / "x.safetensors"), "ckpt", HINT)
    folder = tmp_path / "class-conditional"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"class_embed_type": "timestep"}))
    with pytest.raises(InputError, match="extra embeddings of type 'timestep'"):
        read_sd_unet(str(folder), "ckpt", HINT)
    unet = UNetModel(**UNETS["sd1"])
    partial = {k: v for k, v in unet.state_dict().items() if not k.startswith("out.2")}
    with pytest.raises(InputError, match=r"2 missing \(out.2.bias, out.2.weight\); 1 unexpected"):
        check_keys(unet, {**partial, "extra.weight": torch.zeros(1)}, "x")


@pytest.mark.parametrize("preset", ["sd15", "sd2"])
def test_full_size_layouts_map_every_key_both_ways_without_allocating(preset):
    from conftest import CONF
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "unet" / f"{preset}.yaml")
    if "defaults" in cfg:
        cfg = OmegaConf.merge(
            OmegaConf.load(CONF / "unet" / "sd15.yaml"),
            {k: v for k, v in cfg.items() if k != "defaults"},
        )
    with torch.device("meta"):
        ours = instantiate(cfg)
        theirs = diffusers.UNet2DConditionModel(**unet_diffusers_config(ours.config, 64))
        vae = AutoencoderKL(
            ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4
        )
        dvae = diffusers.AutoencoderKL(**vae_diffusers_config(vae.config))
    for mine, other, blocks in (
        (ours, theirs, layouts.unet_blocks(ours.config)),
        (vae, dvae, layouts.vae_blocks(vae.config)),
    ):
        there, unknown = layouts.convert(mine.state_dict(), blocks, to_diffusers=True)
        assert not unknown
        expected = {k: tuple(v.shape) for k, v in other.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in there.items()} == expected
        back, unknown = layouts.convert(other.state_dict(), blocks, to_diffusers=False)
        assert not unknown
        assert {k: tuple(v.shape) for k, v in back.items()} == {
            k: tuple(v.shape) for k, v in mine.state_dict().items()
        }


def test_stage2_trains_on_sds_vae_with_the_familys_latent_scale(tmp_path, data_dir):
    from conftest import LDM_TINY, compose_config

    from sd_lightning.commands.train import train

    config = {**AutoencoderKL(**VAE).config, "resolution": 32}
    randomize(diffusers.AutoencoderKL(**vae_diffusers_config(config))).save_pretrained(
        tmp_path / "vae"
    )
    run = tmp_path / "run"
    train(
        compose_config(
            [*LDM_TINY, f"vae_ckpt={tmp_path / 'vae'}", "trainer.max_steps=1"], run, data_dir
        )
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert float(ckpt["state_dict"]["latent_scale"]) == pytest.approx(0.18215)  # not estimated
    assert ckpt["sd_lightning"]["vae_config"]["ch_mult"] == [1, 2, 2, 2]  # sampling rebuilds it


def test_clip_text_model_weights_run_in_openclips_tower_with_the_same_states():
    transformers = pytest.importorskip("transformers")
    from open_clip.transformer import QuickGELU, TextTransformer

    from sd_lightning.weights.clip import hf_from_openclip, openclip_from_hf

    cfg = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",  # CLIP ViT-L/14's, as OpenAI trained it
    )
    theirs = randomize(transformers.CLIPTextModel(cfg))
    state = theirs.state_dict()
    tower = TextTransformer(
        context_length=16, vocab_size=1000, width=32, heads=4, layers=3, act_layer=QuickGELU
    ).eval()
    converted = openclip_from_hf(state, "test")
    missing, unexpected = tower.load_state_dict(converted, strict=False)
    assert not unexpected and set(missing) == {"text_projection"}  # SD uses the token states
    tokens = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=tokens).last_hidden_state
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks:
            x = block(x, attn_mask=tower.attn_mask)
        got = tower.ln_final(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    back = hf_from_openclip(converted)  # SD 1's single-file names
    plain = {k.removeprefix("text_model."): v for k, v in state.items()}
    assert {k.removeprefix("text_model.") for k in back} == set(plain) - {"embeddings.position_ids"}
    assert all(torch.equal(v, plain[k.removeprefix("text_model.")]) for k, v in back.items())


def test_sd1_text_encoder_from_a_folder_or_a_single_file_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sd_lightning.conditioning import OpenCLIPTextEncoder

    theirs = clip_model(transformers, heads=1)  # single files assume 64-wide heads, as SD's
    theirs.save_pretrained(tmp_path / "pipe" / "text_encoder")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    single = {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in theirs.state_dict().items()
    }
    save_file({k: v.contiguous() for k, v in single.items()}, tmp_path / "sd1.safetensors")
    prompts = ["a photo of an astronaut riding a horse!", "a red circle"]
    for source in (tmp_path / "pipe", tmp_path / "sd1.safetensors"):
        ours = OpenCLIPTextEncoder(pretrained=str(source), layer="auto")
        assert ours.pad_eot and ours.skip == 0  # SD 1: end-of-text padding, last layer
        tokens = ours.tokenizer(prompts)
        eot = ours.tokenizer.eot_token_id
        assert (tokens == 0).any()  # "!" is token 0: only what follows end-of-text is padding
        padded = torch.where((tokens == eot).cumsum(-1) > 0, eot, tokens)
        with torch.no_grad():
            expected = theirs(input_ids=padded).last_hidden_state
            torch.testing.assert_close(ours(prompts), expected, atol=1e-5, rtol=1e-4)


def test_sd2_text_encoder_from_a_single_file_reads_openclips_names_at_the_penultimate_layer(
    tmp_path,
):
    from open_clip.transformer import TextTransformer

    from sd_lightning.conditioning import OpenCLIPTextEncoder

    tower = randomize(TextTransformer(width=64, heads=1, layers=3, output_dim=64))
    state = {"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()}
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)  # in SD 2 files, unused
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "sd2.safetensors")
    ours = OpenCLIPTextEncoder(pretrained=str(tmp_path / "sd2.safetensors"), layer="auto")
    assert not ours.pad_eot and ours.skip == 1  # SD 2: zero padding, penultimate layer
    prompts = ["a photo of an astronaut riding a horse", "a red circle"]
    tokens = ours.tokenizer(prompts)
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        torch.testing.assert_close(ours(prompts), tower.ln_final(x), atol=1e-5, rtol=1e-4)


def _scheduler(sampler: str):
    """diffusers' scheduler for our ``sampler`` with SD's settings. DDIM: leading spacing,
    offset 1. DPM-Solver++: trailing spacing (diffusers' DPM "leading" spaces by steps + 1, unlike
    its DDIM), ending at the first training step as ours does (``sigma_min``)."""
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**SD_SCHEDULER)
    config = {k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}
    return diffusers.DPMSolverMultistepScheduler(
        **config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="sigma_min",
    )


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_sampling_from_a_diffusers_folder_equals_stable_diffusion_pipeline(tmp_path, sampler):
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.diffusion.guidance import initial_noise

    folder, unet, vae, text, _ = pipeline_folder(tmp_path)
    scheduler = _scheduler(sampler)
    system = load_ldm(str(folder))
    assert system.run_config["data"]["image_size"] == 64  # the U-Net's sample_size x 8
    assert float(system.latent_scale) == pytest.approx(0.18215)
    prompt = "a red circle at the top left"
    spacing = "leading" if sampler == "ddim" else "trailing"
    ours = system.sample_images(
        [prompt], seeds=[0], sampler=sampler, steps=4, guidance=3.0, spacing=spacing
    )

    def embed(caption: str) -> torch.Tensor:  # SD 1's tokens: padded with end-of-text
        tokens = system.conditioner.text_encoder.tokenizer([caption])
        eot = system.conditioner.text_encoder.tokenizer.eot_token_id
        with torch.no_grad():
            return text(input_ids=torch.where((tokens == eot).cumsum(-1) > 0, eot, tokens))[0]

    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=embed(prompt),
            negative_prompt_embeds=embed(""),
            latents=initial_noise([0], (4, 8, 8), "cpu", torch.float32),
            num_inference_steps=4,
            guidance_scale=3.0,
            output_type="pt",
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-4, rtol=1e-4)


def test_stage_sample_takes_a_diffusers_folder_on_the_command_line(tmp_path):
    from conftest import run_cli
    from PIL import Image

    folder, *_ = pipeline_folder(tmp_path)
    out = run_cli(
        "stage=sample",
        f"ckpt={folder}",
        "prompts=['a red circle','a blue square']",
        "steps=2",
        f"hydra.run.dir={tmp_path / 'samples'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    pngs = sorted((tmp_path / "samples").glob("0*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (64, 64)  # the folder's own size
