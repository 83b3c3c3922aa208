"""SDXL, the third family: its U-Net (per-level transformer depth, the vector condition), its two
text encoders and micro-conditioning, its single files and diffusers folders both ways, and
sampling, each against diffusers and transformers (the oracles) at tiny sizes; the full-size
layout on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONF, DATA_TINY, compose_config, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from sd_fixtures import SDXL_SIZE_DIM, SDXL_UNET, randomize, sdxl_pipeline_folder

from sd_lightning.commands.export import export
from sd_lightning.commands.open import load_ldm
from sd_lightning.conditioning.sizes import size_embedding, size_ids
from sd_lightning.core.errors import InputError
from sd_lightning.diffusion.guidance import initial_noise
from sd_lightning.models import UNetModel
from sd_lightning.weights import layouts
from sd_lightning.weights.configs import unet_diffusers_config
from sd_lightning.weights.read import read_sd_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, text_encoder(_2)/config.json (the
# entries that fix the architecture), as published; nothing is downloaded
SDXL_DIFFUSERS_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_TEXT = {  # hidden_size, intermediate_size, layers, heads, activation, projection
    "clip_l": (768, 3072, 12, 12, "quick_gelu", None),
    "clip_g": (1280, 5120, 32, 20, "gelu", 1280),
}


def _config(group: str, name: str):
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    if "defaults" in cfg:  # a tiny preset extends the full one
        base = OmegaConf.load(CONF / group / f"{cfg.defaults[0]}.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return cfg


def test_the_sdxl_preset_is_sgms_u_net_and_maps_every_key_both_ways_without_allocating():
    with torch.device("meta"):
        ours = instantiate(_config("unet", "sdxl"))
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
    config = unet_diffusers_config(ours.config, 128)
    assert {k: config[k] for k in SDXL_DIFFUSERS_UNET} == SDXL_DIFFUSERS_UNET
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**config)
    blocks = layouts.unet_blocks(ours.config)
    there, unknown = layouts.convert(ours.state_dict(), blocks, to_diffusers=True)
    assert not unknown and set(there) == set(theirs.state_dict())
    assert all(there[k].shape == v.shape for k, v in theirs.state_dict().items())
    back, unknown = layouts.convert(theirs.state_dict(), blocks, to_diffusers=False)
    assert not unknown and set(back) == set(ours.state_dict())


def test_the_sdxl_text_preset_builds_sdxls_two_text_encoders():
    from sd_lightning.weights.openclip import text_tower

    cfg = _config("text_encoder", "sdxl")
    for key, (width, mlp, layers, heads, act, proj) in SDXL_TEXT.items():
        node = cfg.encoders[key]
        with torch.device("meta"):
            tower = text_tower(node.name, node.quick_gelu)
        block = tower.transformer.resblocks[0]
        found = (
            tower.transformer.width,
            block.mlp.c_fc.out_features,
            len(tower.transformer.resblocks),
            block.attn.num_heads,
            "quick_gelu" if node.quick_gelu else "gelu",
            tower.text_projection.shape[1] if node.get("pooled") else None,
        )
        assert found == (width, mlp, layers, heads, act, proj), key
        # read as SGM and diffusers read SDXL: penultimate block, no final norm
        assert (node.layer, node.final_norm) == ("penultimate", False), key
    assert (cfg.encoders.clip_l.pad, cfg.encoders.clip_g.pad) == ("eot", "zero")
    width = sum(SDXL_TEXT[k][0] for k in SDXL_TEXT)
    assert width == _config("unet", "sdxl").context_dim == 2048
    assert _config("unet", "sdxl").adm_in_channels == 1280 + 6 * 256


def test_a_tiny_sdxl_u_net_equals_diffusers_text_time_u_net():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ours = randomize(UNetModel(**SDXL_UNET))
    config = unet_diffusers_config(ours.config, 8, SDXL_SIZE_DIM)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    state = convert_ldm_unet_checkpoint(layouts.to_original(ours.state_dict(), "unet"), config)
    theirs.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = (torch.randn(s, generator=g) for s in ((2, 4, 8, 8), (2, 5, 80), (2, 24)))
    t = torch.tensor([3, 700])
    outs = []
    for ids in ([[64, 48, 0, 8, 64, 64], [32, 32, 4, 0, 64, 64]], [[64, 64, 0, 0, 64, 64]] * 2):
        ids = torch.tensor(ids, dtype=torch.float32)  # diffusers' order: original, crop, target
        with torch.no_grad():
            expected = theirs(
                x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
            ).sample
            got = ours(x, t, ctx, torch.cat([pooled, size_embedding(ids, SDXL_SIZE_DIM)], 1))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)  # the sizes reach the output


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return sdxl_pipeline_folder(tmp_path_factory.mktemp("sdxl"))


def test_an_sdxl_folder_conditions_as_the_sdxl_pipeline_encodes(sdxl_folder):
    folder, unet, vae, one, two = sdxl_folder
    system = load_ldm(str(folder))
    assert float(system.latent_scale) == pytest.approx(0.13025)
    assert system.unet.config == {"in_channels": 4, "out_channels": 4, **SDXL_UNET}
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    prompts = ["a red circle at the top left", "a blue square"]
    with torch.no_grad():
        states, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt=None
        )
    ours = system.conditioner.encode(prompts, size=(16, 16))
    torch.testing.assert_close(ours.crossattn, states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.vector[:, :24], pooled, atol=1e-5, rtol=1e-5)
    uncond = system.conditioner.encode(["", ""], size=(16, 16))  # force_zeros_for_empty_prompt
    assert not negative.any() and not negative_pooled.any()
    assert not uncond.crossattn.any() and not uncond.vector[:, :24].any()
    # where transformers pools, read from the folder: the highest id for eos_token_id 2 (SDXL's
    # config), else the first end-of-text
    from sd_lightning.weights.text import read_sd_text

    assert read_sd_text(str(folder), "x", "x", "text_encoder_2").config["pool"] == "argmax"
    # a training batch's sizes are its own; without them a square crop of the latents' size
    batch = {"original_size": torch.tensor([[40, 30]]), "crop_top_left": torch.tensor([[2, 0]])}
    ids = size_ids(batch, 1, (16, 16), torch.device("cpu"))
    assert ids.tolist() == [[40, 30, 2, 0, 16, 16]]


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_sampling_an_sdxl_folder_equals_the_sdxl_pipeline(sdxl_folder, sampler):
    folder, *_ = sdxl_folder
    system = load_ldm(str(folder))
    assert system.run_config["data"]["image_size"] == 16  # the U-Net's sample_size x 2
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    sd = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    sd |= {"beta_schedule": "scaled_linear", "steps_offset": 1}
    spacing = "trailing" if sampler == "dpmpp_2m" else "leading"
    pipe.scheduler = {
        "ddim": lambda: diffusers.DDIMScheduler(**sd, clip_sample=False, set_alpha_to_one=False),
        "euler": lambda: diffusers.EulerDiscreteScheduler(**sd, timestep_spacing="leading"),
        "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(
            **sd,
            algorithm_type="dpmsolver++",
            timestep_spacing="trailing",
            final_sigmas_type="sigma_min",
        ),  # fmt: skip
    }[sampler]()
    prompts = ["a red circle at the top left", "a blue square"]
    for negative in (None, "a green triangle"):  # None: zeros, as SDXL learnt the unconditional
        ours = system.sample_images(
            prompts, seeds=[0, 1], sampler=sampler, steps=4, guidance=3.0, spacing=spacing,
            negative_prompt=negative or "", original_size=(24, 20), crop=(2, 0),
        )  # fmt: skip
        with torch.no_grad():
            theirs = pipe(
                prompts,
                negative_prompt=negative,
                latents=initial_noise([0, 1], (4, 8, 8), "cpu", torch.float32),
                num_inference_steps=4,
                guidance_scale=3.0,
                height=16,
                width=16,
                original_size=(24, 20),
                crops_coords_top_left=(2, 0),
                output_type="pt",
            ).images
        torch.testing.assert_close(ours, theirs * 2 - 1, atol=1e-4, rtol=1e-4)


def _same(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys(), what
    for key, value in b.items():
        assert torch.equal(a[key].float(), value.float()), f"{what}: {key}"


def test_sdxl_weights_go_out_and_come_back_through_both_formats(sdxl_folder, tmp_path):
    folder, unet, vae, one, two = sdxl_folder
    single, pipeline = tmp_path / "xl.safetensors", tmp_path / "xl-pipeline"
    for fmt, out in (("single_file", single), ("diffusers", pipeline)):
        cfg = [f"ckpt={folder}", f"format={fmt}", f"output={out}"]
        export(compose_config(["stage=export", *cfg], tmp_path / "run", tmp_path))
    with safe_open(str(single), "pt") as f:  # SGM's names, and what the tensors do not say
        keys, meta = set(f.keys()), f.metadata()
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    records = json.loads(meta["sd_lightning_text_encoder"])
    assert records["text_encoder_2"]["heads"] == 4 and records["text_encoder"]["layer"] == 1
    # diffusers' own loaders read both back to the tensors diffusers wrote
    from_single = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True
    )
    from_folder = diffusers.StableDiffusionXLPipeline.from_pretrained(str(pipeline))
    assert from_folder.config.force_zeros_for_empty_prompt
    assert from_folder.vae.config.scaling_factor == pytest.approx(0.13025)
    for pipe in (from_single, from_folder):
        for theirs, name in ((unet, "unet"), (vae, "vae"), (one, "text_encoder"), (two, "text_encoder_2")):  # fmt: skip
            _same(getattr(pipe, name), theirs, name)
    # and ours reads them to the same conditions and latent scale, and other writers' variants:
    # older ComfyUI's position_ids buffer beside bigG's weights; v-prediction said only by
    # ComfyUI's and AUTOMATIC1111's empty v_pred tensor (our exports write it too)
    from safetensors.torch import load_file, save_file

    v_file = tmp_path / "xl-v.safetensors"
    cfg = [f"ckpt={folder}", "format=single_file", f"output={v_file}", "prediction=v_prediction"]
    export(compose_config(["stage=export", *cfg], tmp_path / "run", tmp_path))
    bare = load_file(str(v_file))
    assert bare["v_pred"].numel() == 0
    with safe_open(str(v_file), "pt") as f:  # the tiny shapes need our configs; not the target
        kept = {k: v for k, v in f.metadata().items() if k != "prediction_type"}
    comfy = tmp_path / "comfy-xl.safetensors"
    position = "conditioner.embedders.1.model.transformer.text_model.embeddings.position_ids"
    save_file({**bare, position: torch.arange(77)[None]}, str(comfy), metadata=kept)
    assert load_ldm(str(comfy)).prediction == "v_prediction"
    reference = load_ldm(str(folder)).conditioner.encode(["a cat"], size=(16, 16))
    for source in (single, pipeline, comfy):
        system = load_ldm(str(source))
        got = system.conditioner.encode(["a cat"], size=(16, 16))
        assert torch.equal(got.crossattn, reference.crossattn) and torch.equal(
            got.vector, reference.vector
        )
        assert float(system.latent_scale) == pytest.approx(0.13025)
        assert system.run_config["data"]["image_size"] == 16


def test_an_sdxl_refiner_and_mismatched_parts_are_named(tmp_path):
    from sd_lightning.conditioning import Conditioner, TextEncoders
    from sd_lightning.weights.text import read_sd_text

    refiner = dict(SDXL_UNET, context_dim=1280, adm_in_channels=2560)
    state = layouts.to_original(UNetModel(**refiner).state_dict(), "unet")
    path = tmp_path / "sd_xl_refiner.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    with pytest.raises(InputError, match="an SDXL refiner"):
        read_sd_unet(str(path), "ckpt", "SD weights")
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(sd1))
    with pytest.raises(InputError, match="holds one text encoder .* not SDXL's two"):
        read_sd_text(str(sd1), "pretrained", "SD weights", "text_encoder_2")
    tiny = instantiate(_config("text_encoder", "sdxl_tiny"))
    assert isinstance(tiny, TextEncoders) and (tiny.width, tiny.pooled_dim) == (80, 32)
    with pytest.raises(InputError, match="adm_in_channels=100 is the pooled text"):
        Conditioner(tiny, vector_dim=100)
    single = tiny.encoders[0]
    with pytest.raises(InputError, match="gives no pooled vector: use text_encoder=sdxl"):
        Conditioner(single, vector_dim=128)


@pytest.mark.slow
def test_sdxl_trains_from_scratch_and_from_an_sdxl_folder_on_the_command_line(
    sdxl_folder, tmp_path, data_dir
):
    folder, *_ = sdxl_folder
    common = [*DATA_TINY, "stage=ldm", "trainer.max_steps=2", "logger=csv"]
    common += ["model.val_prompts=['a red circle']", "model.val_sampler.steps=2"]
    common += [f"paths.data_dir={data_dir}"]
    scratch = run_cli(
        *common,
        "experiment=demo_sdxl",
        f"vae_ckpt={folder}",
        "data.image_size=32",
        f"hydra.run.dir={tmp_path / 'scratch'}",
    )
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    tuned = run_cli(
        *common, f"pretrained={folder}", "data.image_size=32", f"hydra.run.dir={tmp_path / 'ft'}"
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    log = tuned.stdout + tuned.stderr
    assert "SDXL's U-Net" in log and "two: CLIP ViT-L and OpenCLIP ViT-bigG" in log
    for run in ("scratch", "ft"):
        system = load_ldm(str(tmp_path / run / "checkpoints" / "last.ckpt"))
        assert system.conditioner.vector and system.unet.config["adm_in_channels"]
        images = system.sample_images(["a red circle"], steps=2, image_size=32)
        assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_an_sdxl_lora_exports_kohyas_sdxl_names_that_diffusers_loads(
    sdxl_folder, tmp_path, data_dir
):
    """The U-Net's LoRA on SDXL: kohya's file names SGM's layers (ours), not diffusers' paths as
    for SD 1/2, with kohya's SDXL metadata; diffusers' SDXL ``load_lora_weights`` reads both
    files into the U-Net function ours has; sampling merges it; text-encoder LoRA and textual
    inversion are refused, naming SDXL."""
    from safetensors.torch import load_file

    from sd_lightning.commands.open import apply_loras
    from sd_lightning.commands.train import train

    folder, *_ = sdxl_folder
    run = tmp_path / "run"
    lora = [*DATA_TINY, "experiment=lora", "finetune.rank=4", "finetune.alpha=8"]
    lora += ["model.optimizer.lr=3e-2", "model.val_prompts=[]", "data.image_size=32"]
    train(compose_config([*lora, f"pretrained={folder}", "trainer.max_steps=2"], run, data_dir))
    system = load_ldm(run / "checkpoints" / "last.ckpt")
    g = torch.Generator().manual_seed(3)
    x, ctx, y = (torch.randn(s, generator=g) for s in ((2, 4, 8, 8), (2, 5, 80), (2, 72)))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = system.unet(x, t, ctx, y)
        assert (ours - load_ldm(str(folder)).unet(x, t, ctx, y)).abs().max() > 1e-3
    kohya, meta = load_file(run / "export" / "lora.safetensors"), None
    with safe_open(str(run / "export" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in kohya)
    # the vector is diffusers' pooled text + its own embedding of these time ids
    pooled, ids = y[:, :24], torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    y = torch.cat([pooled, size_embedding(ids, SDXL_SIZE_DIM)], 1)
    with torch.no_grad():
        ours = system.unet(x, t, ctx, y)
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
        pipe.load_lora_weights(str(run / "export"), weight_name=name)
        added = {"text_embeds": pooled, "time_ids": ids}
        with torch.no_grad():
            theirs = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4, msg=name)
    merged = load_ldm(str(folder))
    apply_loras(merged, [str(run / "export" / "lora.safetensors")], 1.0)
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, ctx, y), ours, atol=1e-5, rtol=1e-4)
    # a LoRA of another family (kohya's metadata says SD 1) is named before anything changes
    from safetensors.torch import save_file

    sd1 = tmp_path / "sd1-lora.safetensors"
    save_file(kohya, str(sd1), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(InputError, match="is a LoRA of SD 1.x, but this model is SDXL"):
        apply_loras(load_ldm(str(folder)), [str(sd1)], 1.0)


@pytest.mark.slow
def test_sdxl_latent_shards_keep_the_pooled_text_and_the_crop_and_train(
    tmp_path, vae_ckpt, data_dir
):
    """``stage=encode`` with SDXL's two text encoders stores both states, the pooled vector and
    the crop's geometry; ``data=latents`` trains on them without the encoders."""
    from sd_lightning.commands.encode import encode
    from sd_lightning.commands.train import train
    from sd_lightning.data.latents import LatentSampleDecoder
    from sd_lightning.data.pipeline import ShardPipeline
    from sd_lightning.data.shards import expand_urls

    data = [o for o in DATA_TINY if not o.startswith(("logger=", "trainer="))]
    out = tmp_path / "latents"
    cfg = compose_config(
        ["stage=encode", *data, "text_encoder=sdxl_tiny", f"vae_ckpt={vae_ckpt}", f"output={out}",
         "samples_per_shard=20", "dtype=float32"], tmp_path / "enc", data_dir,
    )  # fmt: skip
    urls = encode(cfg)["urls"]
    stored = ShardPipeline(expand_urls(urls), None, 4, resampled=False, shuffle_buffer=0,
                           decoder=LatentSampleDecoder(text_states=True))  # fmt: skip
    batch = next(iter(stored))
    text = instantiate(_config("text_encoder", "sdxl_tiny"))
    states, pooled = text.encode(batch["caption"])
    torch.testing.assert_close(batch["text_states"], states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["text_pooled"], pooled, atol=1e-5, rtol=1e-5)
    assert batch["original_size"].tolist() == [[32, 32]] * 4  # the demo's 32 px squares
    assert batch["crop_top_left"].tolist() == [[0, 0]] * 4
    run = tmp_path / "ldm"
    ldm = [*DATA_TINY, "stage=ldm", "data=latents", f"data.urls='{urls}'", "data.val_shards=0"]
    ldm += ["unet=sdxl_tiny", "text_encoder=sdxl_tiny", f"vae_ckpt={vae_ckpt}"]
    ldm += ["trainer.max_steps=2", "model.val_prompts=[]", "trainer.limit_val_batches=0"]
    metrics = train(compose_config(ldm, run, data_dir))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_an_sdxl_lora_of_both_text_encoders_merges_as_diffusers_loads_it(sdxl_folder, tmp_path):
    """What diffusers' SDXL LoRA scripts save (peft adapters on the U-Net and on both text
    encoders, ``text_encoder.`` and ``text_encoder_2.``, with peft's config as metadata), and
    the same in kohya's names (``lora_te1_``/``lora_te2_``), merged by ``lora=`` into the same
    conditions and U-Net diffusers' ``load_lora_weights`` gives."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import load_file, save_file

    from sd_lightning.commands.open import apply_loras

    folder, *_ = sdxl_folder
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    text_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    pipe.unet.add_adapter(unet_cfg)
    for net in (pipe.text_encoder, pipe.text_encoder_2):
        inject_adapter_in_model(text_cfg, net)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for net in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path / "lora"
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_cfg.to_dict(),
    )
    path = out / "pytorch_lora_weights.safetensors"
    # kohya's names for the same adapters, alpha written beside each layer
    kohya = {}
    for key, value in load_file(path).items():
        network, _, rest = key.partition(".")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
        stem, _, part = rest.rpartition(".lora_")
        if network != "unet" and not stem.startswith("text_model."):  # (transformers 5's CLIP)
            stem = "text_model." + stem
        name = prefix[network] + stem.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    kohya_path = tmp_path / "kohya.safetensors"
    save_file(kohya, str(kohya_path))

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.load_lora_weights(str(path))
    prompts = ["a red circle at the top left"]
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]])
        x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
        added = {"text_embeds": pooled, "time_ids": ids}
        theirs = pipe.unet(x, t, states, added_cond_kwargs=added).sample
    for source in (path, kohya_path):
        system = load_ldm(str(folder))
        apply_loras(system, [str(source)], 1.0)
        ours = system.conditioner.encode(prompts, size=(16, 16))
        torch.testing.assert_close(ours.crossattn, states, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.vector[:, :24], pooled, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            got = system.sampling_net(x, t, **ours.kwargs())
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-4)


def test_an_sdxl_vae_for_an_sd_u_net_is_refused_before_any_work(sdxl_folder, small_base, tmp_path):
    from sd_lightning.commands.pretrained import configure

    folder, *_ = sdxl_folder
    cfg = compose_config(
        [*DATA_TINY, "stage=ldm", f"pretrained={small_base}", f"vae_ckpt={folder}"],
        tmp_path / "run",
        tmp_path,
    )
    with pytest.raises(
        InputError, match=r"is SDXL's VAE \(latent scale 0.13025\), but pretrained="
    ):
        configure(cfg)


def test_the_original_size_comes_from_the_image_or_what_its_json_records():
    """SDXL conditions on the size before any resizing: img2dataset records it in the shard's
    ``.json`` (``original_width``/``original_height``) when it stored a smaller copy."""
    import io

    from PIL import Image

    from sd_lightning.data.pipeline import ImageSampleDecoder
    from sd_lightning.data.transforms import ImageTransform

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 10, 10)).save(buf, format="PNG")
    decode = ImageSampleDecoder(ImageTransform(16, crop="center"))
    sample = {"png": buf.getvalue(), "txt": b"a red box", "__key__": "k"}
    plain = decode(dict(sample))
    assert plain["original_size"].tolist() == [32, 48]  # (height, width) of the image itself
    assert plain["crop_top_left"].tolist() == [0, 4] and plain["target_size"].tolist() == [16, 16]
    recorded = json.dumps({"original_width": 1536, "original_height": 1024, "width": 48})
    resized = decode({**sample, "json": recorded.encode()})
    assert resized["original_size"].tolist() == [1024, 1536]
    assert decode({**sample, "json": b"{not json"})["original_size"].tolist() == [32, 48]
    cropped = json.dumps({"original_width": 1024, "original_height": 1024})  # img2dataset cropped
    assert decode({**sample, "json": cropped.encode()})["original_size"].tolist() == [32, 48]


@pytest.mark.slow
def test_dreambooth_on_sdxl_with_buckets_conditions_on_each_photos_size(
    sdxl_folder, tmp_path, data_dir, monkeypatch
):
    """DreamBooth on an SDXL folder from photos of three aspect ratios: the class images come
    from the SDXL base (its conditioner, sizes included), every batch is one bucket, and each
    sample's original size and crop reach the U-Net's vector condition."""
    import numpy as np
    from PIL import Image

    from sd_lightning.commands.train import train
    from sd_lightning.conditioning.conditioner import Conditioner

    folder, *_ = sdxl_folder
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (w, h) in enumerate([(40, 64), (64, 40), (48, 48)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(photos / f"{i}.png")
    seen = []
    forward = Conditioner.forward

    def spy(self, batch, *args, **kwargs):  # what the U-Net is conditioned on, batch by batch
        seen.append(
            {k: batch[k].tolist() for k in ("original_size", "crop_top_left", "target_size")}
        )
        return forward(self, batch, *args, **kwargs)

    cfg = [
        "trainer=debug", "logger=none", "data.image_size=32", "data.bucket_step=8",
        "data.batch_size=2", "model.val_sampler.steps=2", "experiment=dreambooth", "data=folder",
        f"data.path={photos}", f"pretrained={folder}", "trainer.max_steps=3",
        "finetune.instance_prompt='a photo of sks disc'", "finetune.class_prompt='a photo of a disc'",
        "finetune.num_class_images=2", "finetune.sampler.steps=2",
    ]  # fmt: skip
    monkeypatch.setattr(Conditioner, "forward", spy)  # a spy: the real forward, recorded
    train(compose_config(cfg, tmp_path / "run", data_dir))
    assert len(list((data_dir / "dreambooth").glob("a_photo_of_a_disc-*/*.png"))) == 2
    originals = {tuple(o) for s in seen for o in s["original_size"]}
    assert {(64, 40), (40, 64)} <= originals  # the portrait's and the landscape's own sizes
    for s in seen:  # one bucket per batch
        assert len({tuple(t) for t in s["target_size"]}) == 1


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Teal discs on grey, portrait, landscape and square."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate([(40, 64), (64, 40), (48, 48)]):
        pixels = np.full((h, w, 3), 200, np.uint8)
        yy, xx = np.mgrid[:h, :w]
        pixels[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(w, h) / 3) ** 2] = (0, 128, 128)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


FOLDER = [
    "trainer=debug", "logger=none", "data.image_size=32", "data.bucket_step=8",
    "data.batch_size=2", "model.val_sampler.steps=2", "data=folder", "trainer.max_steps=3",
]  # fmt: skip


def test_textual_inversion_on_sdxl_trains_both_encoders_vectors_read_by_diffusers(
    sdxl_folder, photos, tmp_path, data_dir
):
    """The new word joins both text encoders; its vectors train side by side and export as
    SDXL's clip_l/clip_g file and diffusers' two files, which ``load_textual_inversion`` reads
    into both encoders to our conditions; ``embeddings=`` reads the file back."""
    from safetensors.torch import load_file

    from sd_lightning.commands.open import load_ldm
    from sd_lightning.commands.train import train
    from sd_lightning.finetune.embedding_files import load_embeddings

    folder, *_ = sdxl_folder
    run = tmp_path / "run"
    cfg = [*FOLDER, f"data.path={photos}", f"pretrained={folder}", "experiment=textual_inversion"]
    cfg += ["finetune.token='<c1>'", "finetune.init_word=blue", "finetune.num_vectors=2"]
    cfg += ["model.optimizer.lr=5e-2", "data.caption='a photo of <c1>'"]
    train(compose_config(cfg, run, data_dir))
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["embeddings.weight"].shape == (2, 80)  # CLIP-L's 32 and bigG's 48, side by side
    sdxl_file = load_file(run / "export" / "c1.safetensors")
    assert {k: tuple(v.shape) for k, v in sdxl_file.items()} == {
        "clip_l": (2, 32),
        "clip_g": (2, 48),
    }
    prompts = ["a photo of <c1> at the top left"]
    trained = load_ldm(run / "checkpoints" / "last.ckpt").conditioner.encode(prompts, size=(16, 16))
    base = load_ldm(str(folder)).conditioner.encode(prompts, size=(16, 16))
    assert (trained.crossattn - base.crossattn).abs().max() > 1e-3  # the vectors moved
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    for key, encoder, tokenizer in (  # as diffusers' docs load an SDXL embedding
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        pipe.load_textual_inversion(
            sdxl_file[key], token="<c1>", text_encoder=encoder, tokenizer=tokenizer
        )
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        # bigG pools at the end-of-text token (kohya's pool workaround, ComfyUI, AUTOMATIC1111);
        # diffusers' argmax (eos_token_id 2) lands on the new word instead, a known divergence
        words = pipe.tokenizer_2(
            pipe.maybe_convert_prompt(prompts[0], pipe.tokenizer_2), padding="max_length",
            max_length=77, truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        last = pipe.text_encoder_2(words, output_hidden_states=True).last_hidden_state
        at_eot = last[0, (words[0] == 49407).int().argmax()]
        expected = pipe.text_encoder_2.text_projection(at_eot)[None]
    torch.testing.assert_close(trained.crossattn, states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trained.vector[:, :24], expected, atol=1e-5, rtol=1e-4)
    assert (pooled - expected).abs().max() > 1e-3  # diffusers' pools at the new word
    sampling = load_ldm(str(folder))  # stage=sample embeddings=[...] on the base
    assert load_embeddings(
        sampling.conditioner.text_encoder, [run / "export" / "c1.safetensors"]
    ) == ["<c1>"]
    again = sampling.conditioner.encode(prompts, size=(16, 16))
    torch.testing.assert_close(again.crossattn, trained.crossattn, atol=1e-6, rtol=1e-5)
    for name, width in (("learned_embeds", 32), ("learned_embeds_2", 48)):
        assert load_file(run / "export" / f"{name}.safetensors")["<c1>"].shape == (2, width)


def test_a_lora_of_both_sdxl_text_encoders_trains_and_diffusers_loads_it(
    sdxl_folder, photos, tmp_path, data_dir
):
    from safetensors.torch import load_file

    from sd_lightning.commands.open import apply_loras, load_ldm
    from sd_lightning.commands.train import train

    folder, *_ = sdxl_folder
    run = tmp_path / "run"
    cfg = [*FOLDER, f"data.path={photos}", f"pretrained={folder}", "experiment=lora"]
    cfg += ["finetune.rank=4", "finetune.alpha=8", "finetune.text_encoder=true"]
    cfg += ["model.optimizer.lr=3e-2", "data.caption='a teal disc'"]
    train(compose_config(cfg, run, data_dir))
    kohya = load_file(run / "export" / "lora.safetensors")
    for prefix in (
        "lora_te1_text_model_encoder_layers_0_",
        "lora_te2_text_model_encoder_layers_3_",
    ):
        assert any(k.startswith(prefix) for k in kohya), prefix  # bigG's last block: it pools
    assert not any(k.startswith("lora_te_") for k in kohya)
    system = load_ldm(run / "checkpoints" / "last.ckpt")
    prompts = ["a teal disc at the top left"]
    ours = system.conditioner.encode(prompts, size=(16, 16))
    base = load_ldm(str(folder)).conditioner.encode(prompts, size=(16, 16))
    assert (ours.vector - base.vector).abs().max() > 1e-3  # the pooled text moved too
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
        pipe.load_lora_weights(str(run / "export"), weight_name=name)
        with torch.no_grad():
            states, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        torch.testing.assert_close(states, ours.crossattn, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(pooled, ours.vector[:, :24], atol=1e-5, rtol=1e-4, msg=name)
    apply_loras(system, [], 1.0)  # the run's own adapters merged (sampling, export)
    merged = system.conditioner.encode(prompts, size=(16, 16))
    torch.testing.assert_close(merged.crossattn, ours.crossattn, atol=1e-5, rtol=1e-4)


def test_sdxl_shards_per_block_and_caches_pooled_states_when_offloaded(tmp_path):
    """FSDP2 per block (one gloo rank) keeps the SDXL-shaped U-Net's names and outputs, its
    vector condition included; an offloaded text encoder's cache keeps the pooled vector."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sd_lightning.conditioning import Conditioner
    from sd_lightning.models.parallel import fully_shard_unet, is_dtensor

    torch.manual_seed(0)
    plain = randomize(UNetModel(**SDXL_UNET))
    sharded = UNetModel(**SDXL_UNET)
    sharded.load_state_dict(plain.state_dict())
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0, world_size=1
    )
    try:
        fully_shard_unet(sharded, init_device_mesh("cpu", (1,)))
        assert all(is_dtensor(p) for p in sharded.parameters())
        assert list(sharded.state_dict()) == list(plain.state_dict())
        g = torch.Generator().manual_seed(1)
        x, ctx, y = (torch.randn(s, generator=g) for s in ((2, 4, 8, 8), (2, 5, 80), (2, 72)))
        with torch.no_grad():
            torch.testing.assert_close(
                sharded(x, torch.tensor([5, 600]), ctx, y), plain(x, torch.tensor([5, 600]), ctx, y)
            )
    finally:
        dist.destroy_process_group()
    text = instantiate(_config("text_encoder", "sdxl_tiny"))
    online = Conditioner(text, vector_dim=128).encode(["a cat", "", "a cat"], size=(16, 16))
    offloaded = Conditioner(text, offload=True, vector_dim=128)
    for _ in range(2):  # encoded, then from the cache
        got = offloaded.encode(["a cat", "", "a cat"], size=(16, 16))
        torch.testing.assert_close(got.crossattn, online.crossattn)
        torch.testing.assert_close(got.vector, online.vector)
    assert set(offloaded._cache) == {"a cat", ""}
