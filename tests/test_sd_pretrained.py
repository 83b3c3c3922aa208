"""Fine-tuning from Stable Diffusion's weights (``pretrained=``): diffusers-written tiny folders
and original single files start stage 2 (U-Net, EMA, VAE, text encoder) and stage 1 (SD's VAE,
decoder fine-tune); runs train, resume and sample like runs from scratch; bad files are errors
naming the file and the fix."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import DATA_TINY, LDM_TINY, TINY, compose_config, run_cli_all
from hydra.utils import instantiate
from safetensors.torch import save_file
from sd_fixtures import SMALL_UNET, SMALL_VAE, UNETS, pipeline_folder, randomize

from sd_lightning.commands import pretrained
from sd_lightning.models import AutoencoderKL, UNetModel
from sd_lightning.weights import layouts
from sd_lightning.weights.configs import unet_config_from_diffusers
from sd_lightning.weights.layouts import to_original

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# single files do not say their GroupNorm groups: SD's 32, so 32-channel levels at the least
FILE_UNET = {**UNETS["sd1"], "channel_mult": [1, 2], "attention_levels": [0, 1]}
FILE_VAE = {**SMALL_VAE, "ch": 32, "norm_groups": 32}
LDM = [
    *DATA_TINY,
    "stage=ldm",
    "model.val_prompts=['a red circle']",
    "model.val_sampler.steps=2",
    "model.lr_scheduler=null",
]


def _ours(diffusers_net, config, blocks):
    state, unknown = layouts.convert(diffusers_net.state_dict(), blocks, to_diffusers=False)
    assert not unknown
    return state


def test_stage2_fine_tunes_a_diffusers_folder_resumes_and_samples(tmp_path, data_dir):
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.commands.train import train

    folder, unet, vae, *_ = pipeline_folder(tmp_path, SMALL_UNET, SMALL_VAE, sample_size=16)
    config = unet_config_from_diffusers(dict(unet.config), "test")
    expected = _ours(unet, config, layouts.unet_blocks(config))
    run = tmp_path / "run"
    # learning rate 0: the checkpoint holds exactly what was loaded
    train(
        compose_config(
            [*LDM, f"pretrained={folder}", "trainer.max_steps=1", "model.optimizer.lr=0"],
            run,
            data_dir,
        )
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    saved = ckpt["sd_lightning"]["config"]
    assert {k: saved["unet"][k] for k in config} == config  # the folder's architecture
    assert saved["text_encoder"]["pretrained"] == str(folder)  # its CLIP, not the random tower
    assert saved["vae_ckpt"] == str(folder)
    assert float(ckpt["state_dict"]["latent_scale"]) == pytest.approx(0.18215)
    for key, value in expected.items():
        assert torch.equal(ckpt["state_dict"][f"unet.{key}"], value), key
        assert torch.equal(ckpt["state_dict"][f"ema.net.{key}"], value), key  # no EMA copy: same
    # resumed (the optimizer's learning rate 0 restored with it): the checkpoint's weights, not
    # the folder's, though the folder changed since
    randomize(unet, seed=7).save_pretrained(folder / "unet")
    train(compose_config([*LDM, f"pretrained={folder}", "trainer.max_steps=3"], run, data_dir))
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    for key in expected:
        assert torch.equal(resumed["state_dict"][f"unet.{key}"], ckpt["state_dict"][f"unet.{key}"])
    system = load_ldm(run / "checkpoints" / "last.ckpt")
    images = system.sample_images(["a red circle"], seeds=[0], sampler="ddim", steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def _sd1_single_file(tmp_path, ema: bool, suffix: str = ".safetensors"):
    """An original SD 1 single file at tiny size (768-d context, so the family is told), with a
    1-layer CLIP text model of SD 1's width and a small vocabulary, and ``model_ema.``."""
    unet = randomize(UNetModel(**FILE_UNET), 1)
    vae = randomize(AutoencoderKL(**FILE_VAE), 2)
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1000,
            hidden_size=768,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        )
    )
    state = {**to_original(unet.state_dict(), "unet"), **to_original(vae.state_dict(), "vae")}
    for k, v in text.state_dict().items():
        state[
            "cond_stage_model.transformer."
            + ("" if k.startswith("text_model.") else "text_model.")
            + k
        ] = v
    shadow = randomize(UNetModel(**FILE_UNET), 3)
    if ema:
        for name, value in shadow.state_dict().items():
            state["model_ema." + ("diffusion_model." + name).replace(".", "")] = value
        state["model_ema.num_updates"] = torch.tensor(1234)
    path = tmp_path / f"sd1{suffix}"
    state = {k: v.contiguous() for k, v in state.items()}
    if suffix == ".ckpt":  # as SD's .ckpt files hold it, loadable with weights_only=True
        torch.save({"state_dict": state, "global_step": 470000}, path)
    else:
        save_file(state, path)
    return path, unet, shadow


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_files_ema_copy_starts_the_ema_and_its_online_weights_the_unet(
    tmp_path, data_dir, suffix
):
    path, unet, shadow = _sd1_single_file(tmp_path, ema=True, suffix=suffix)
    cfg = compose_config([*LDM, f"pretrained={path}"], tmp_path / "run", data_dir)
    pretrained.configure(cfg)
    assert cfg.unet.context_dim == 768 and cfg.unet.channel_mult == [1, 2]
    assert cfg.text_encoder.pretrained == str(path) and cfg.text_encoder.layer == "auto"
    system = instantiate(cfg.model)
    assert (
        system.conditioner.text_encoder.width == 768 and system.conditioner.text_encoder.pad_eot
    )  # SD 1's CLIP
    pretrained.load(system, cfg, resume=None)
    for key, value in unet.state_dict().items():
        assert torch.equal(system.unet.state_dict()[key], value), key
    for key, value in shadow.state_dict().items():
        assert torch.equal(system.ema.net.state_dict()[key], value), key
    assert system.ema.updates() == 1234  # its decay goes on where the file's left off


def test_stage1_fine_tunes_sds_vae_decoder_and_stage2_keeps_its_latent_scale(tmp_path, data_dir):
    from sd_lightning.commands.train import train

    folder, _, vae, *_ = pipeline_folder(tmp_path, SMALL_UNET, SMALL_VAE, sample_size=16)
    run = tmp_path / "vae_run"
    train(compose_config([*TINY, f"pretrained={folder}", "trainer.max_steps=2"], run, data_dir))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    config = ckpt["sd_lightning"]["config"]
    assert config["model"]["freeze_encoder"] is True  # a decoder fine-tune by default
    assert config["vae"]["scaling_factor"] == pytest.approx(0.18215)
    ours = AutoencoderKL(**{k: v for k, v in config["vae"].items() if k != "_target_"})
    start = _ours(vae, ours.config, layouts.vae_blocks(ours.config))
    state = {
        k[len("autoencoder.") :]: v for k, v in ckpt["state_dict"].items() if "autoencoder." in k
    }
    assert all(torch.equal(state[k], v) for k, v in start.items() if k.startswith("encoder."))
    assert not torch.equal(state["decoder.conv_out.weight"], start["decoder.conv_out.weight"])
    # stage 2 on it: SD's latent scale, not one estimated from a batch
    ldm_run = tmp_path / "ldm_run"
    train(
        compose_config(
            [*LDM_TINY, f"vae_ckpt={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=1"],
            ldm_run,
            data_dir,
        )
    )
    ldm = torch.load(ldm_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert float(ldm["state_dict"]["latent_scale"]) == pytest.approx(0.18215)


def test_bad_pretrained_files_name_the_file_and_the_fix(tmp_path, ldm_ckpt):
    good, *_ = _sd1_single_file(tmp_path, ema=False)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:100_000])  # an interrupted download
    pickled = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1e-4)}, pickled)
    vae_only = tmp_path / "vae-ft-mse.safetensors"
    vae = AutoencoderKL(**SMALL_VAE).state_dict()
    save_file({k: v.contiguous() for k, v in vae.items()}, vae_only)
    xl = tmp_path / "sd_xl_refiner.safetensors"
    refiner = {"channel_mult": [1, 2], "attention_levels": [0, 1], "context_dim": 1280}
    xl_unet = UNetModel(**{**UNETS["sd1"], **refiner, "adm_in_channels": 2560})
    save_file({k: v.contiguous() for k, v in to_original(xl_unet.state_dict(), "unet").items()}, xl)
    base = [*LDM, "trainer.max_steps=1"]
    cases = [
        (cut, "is damaged or incomplete"),
        (pickled, "needs pickle to load"),
        (vae_only, "is a VAE, with no SD U-Net (no model.diffusion_model.* keys)"),
        (xl, "is an SDXL refiner (1280-d context, 2560-d vector condition)"),
        (ldm_ckpt, "is a stage=ldm checkpoint of sd_lightning: pretrained= takes Stable Diffusion"),
    ]
    results = run_cli_all(
        [
            [*base, f"pretrained={p}", f"hydra.run.dir={tmp_path / f'run{i}'}"]
            for i, (p, _) in enumerate(cases)
        ]
    )
    for (path, message), out in zip(cases, results):
        assert out.returncode == 1, (path, out.stderr[-2000:])
        assert f"Error: pretrained='{path}' {message}" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert "from safetensors.torch import save_file" in results[1].stderr  # how to convert it
    assert not any((tmp_path / f"run{i}" / "checkpoints").exists() for i in range(len(cases)))


def test_pretrained_v_prediction_weights_fine_tune_with_their_target(tmp_path, data_dir, caplog):
    """``model.prediction`` (null) follows what the weights record: a folder's scheduler, our
    single file's metadata; set against the record, it stays and is said."""
    from sd_lightning.commands.export import export

    folder, *_ = pipeline_folder(tmp_path, SMALL_UNET, SMALL_VAE, 16, prediction="v_prediction")
    single = tmp_path / "v.safetensors"
    export(
        compose_config(
            ["stage=export", f"ckpt={folder}", "format=single_file", f"output={single}"],
            tmp_path / "e",
            data_dir,
        )
    )
    for source in (folder, single):
        cfg = compose_config([*LDM, f"pretrained={source}"], tmp_path / "run", data_dir)
        pretrained.configure(cfg)
        assert cfg.model.prediction == "v_prediction", source
        assert instantiate(cfg.model).prediction == "v_prediction"
    cfg = compose_config(
        [*LDM, f"pretrained={folder}", "model.prediction=epsilon"], tmp_path / "run", data_dir
    )
    with caplog.at_level("WARNING"):
        pretrained.configure(cfg)
    assert cfg.model.prediction == "epsilon" and "records v_prediction prediction" in caplog.text
