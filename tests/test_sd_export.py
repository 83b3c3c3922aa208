"""``stage=export``: what we write, read back by diffusers itself (the oracle, test-only).
Round trips (a diffusers-written folder -> ours -> a single file or a folder -> diffusers'
``from_single_file`` / ``from_pretrained``) give the original tensors; a trained checkpoint's
export samples the same images in diffusers' pipeline as in ours."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, run_cli_all
from safetensors import safe_open
from sd_fixtures import UNETS, pipeline_folder, randomize

from sd_lightning.commands.export import export
from sd_lightning.models import AutoencoderKL, UNetModel
from sd_lightning.weights.layouts import to_original

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _export(tmp_path, ckpt, fmt: str, output, *more: str) -> dict:
    cfg = compose_config(
        ["stage=export", f"ckpt={ckpt}", f"format={fmt}", f"output={output}", *more],
        tmp_path / "export_run",
        tmp_path,
    )
    return export(cfg)


def _same(ours: torch.nn.Module, theirs: torch.nn.Module, what: str) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b), (what, set(a) ^ set(b))
    for key in a:
        assert a[key].device.type != "meta" and torch.equal(a[key], b[key]), (what, key)


def test_a_diffusers_folder_round_trips_through_both_formats(tmp_path):
    folder, unet, vae, text, _ = pipeline_folder(tmp_path)
    single = tmp_path / "out" / "model.safetensors"
    assert _export(tmp_path, folder, "single_file", single)["missing"] == []
    with safe_open(str(single), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}  # what A1111 loads
    # diffusers' own single-file loader, its configs from the original folder (offline)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(single), config=str(folder), local_files_only=True
    )
    for ours, theirs, what in (
        (pipe.unet, unet, "unet"),
        (pipe.vae, vae, "vae"),
        (pipe.text_encoder, text, "text encoder"),
    ):
        _same(ours, theirs, what)
    out = tmp_path / "out" / "pipeline"
    _export(tmp_path, folder, "diffusers", out)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    for ours, theirs, what in (
        (pipe.unet, unet, "unet"),
        (pipe.vae, vae, "vae"),
        (pipe.text_encoder, text, "text encoder"),
    ):
        _same(ours, theirs, what)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.unet.config.sample_size == 8
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:5] == [49406, 320, 736, 7117, 49407] and ids[-1] == 49407  # SD 1's padding


def _sd2_file(tmp_path):
    """An original SD 2 single file at tiny size: 1024-d context with linear projections, and
    OpenCLIP's text tower (GELU, read at its penultimate block) with a small vocabulary."""
    from open_clip.transformer import TextTransformer

    unet = randomize(
        UNetModel(**{**UNETS["sd2"], "channel_mult": [1, 2], "attention_levels": [0, 1]}), 1
    )
    vae = randomize(AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1), 2)
    tower = TextTransformer(
        context_length=77, vocab_size=1000, width=1024, heads=16, layers=3, mlp_ratio=0.25
    )
    tower = randomize(tower, 3)
    state = {**to_original(unet.state_dict(), "unet"), **to_original(vae.state_dict(), "vae")}
    state.update({"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()})
    path = tmp_path / "sd2.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, unet, tower


def test_an_sd2_file_exports_a_folder_whose_text_encoder_ends_where_sd_reads(tmp_path):
    path, unet, tower = _sd2_file(tmp_path)
    out = tmp_path / "sd2-diffusers"
    _export(tmp_path, path, "diffusers", out, "prediction=v_prediction", "dtype=float16")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("conv_in.weight").dtype == torch.float16  # dtype=float16: half size
    assert pipe.unet.config.cross_attention_dim == 1024
    assert pipe.text_encoder.config.num_hidden_layers == 2  # 3 blocks, read at the penultimate
    assert pipe.tokenizer.pad_token_id == 0  # SD 2 pads with "!"
    tokens = torch.randint(1, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in tower.transformer.resblocks[:-1]:
            x = block(x, attn_mask=tower.attn_mask)
        expected = tower.ln_final(x)
        got = pipe.text_encoder.float()(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # float16 weights
    sample = torch.randn(1, 4, 16, 16)
    t, ctx = torch.tensor([500]), torch.randn(1, 5, 1024)
    with torch.no_grad():
        theirs = pipe.unet.float()(sample, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(
            theirs, unet.half().float()(sample, t, ctx), atol=1e-3, rtol=1e-3
        )


def test_a_trained_checkpoint_exports_what_samples_the_same_in_diffusers(tmp_path, ldm_ckpt):
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.diffusion.guidance import initial_noise

    out = tmp_path / "tiny-diffusers"
    result = _export(tmp_path, ldm_ckpt, "diffusers", out)
    assert result["missing"] == ["text encoder", "tokenizer"]  # the random tower: no SD layout
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(out), text_encoder=None, tokenizer=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    system = load_ldm(ldm_ckpt)
    prompt, size = "a red circle", system._image_size()
    ours = system.sample_images([prompt], seeds=[0], sampler="ddim", steps=4, guidance=3.0)
    latent = size // system.vae.downsample_factor
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=system.encode_text([prompt]),
            negative_prompt_embeds=system.encode_text([""]),
            latents=initial_noise([0], (4, latent, latent), "cpu", torch.float32),
            num_inference_steps=4,
            guidance_scale=3.0,
            output_type="pt",
            return_dict=False,
        )[0]
    # diffusers' output is clamped to [0, 1]
    torch.testing.assert_close(ours.clamp(-1, 1), theirs * 2 - 1, atol=1e-4, rtol=1e-4)
    single = tmp_path / "tiny.safetensors"
    assert _export(tmp_path, ldm_ckpt, "single_file", single)["missing"] == ["text encoder"]


def test_export_options_are_checked_before_anything_is_read(tmp_path, ldm_ckpt):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    base = ["stage=export", f"ckpt={ldm_ckpt}", f"hydra.run.dir={tmp_path / 'run'}"]
    cases = [
        (
            [*base, "format=onnx", f"output={tmp_path / 'a'}"],
            "format='onnx': choose single_file or diffusers",
        ),
        (
            [*base, f"output={taken}"],
            f"output='{taken}' exists: give a new path, or overwrite=true",
        ),
        ([*base, f"output={tmp_path / 'a.ckpt'}"], "give a path ending in .safetensors"),
        ([*base[:-2], f"hydra.run.dir={tmp_path / 'run'}"], "stage=export needs ckpt=..."),
        (
            [*base, "dtype=int8", f"output={tmp_path / 'b.safetensors'}"],
            "dtype='int8': choose float32",
        ),
        ([*base, f"output={tmp_path / 'ok.safetensors'}", "dtype=float16"], None),
    ]
    results = run_cli_all([args for args, _ in cases])
    for (args, message), out in zip(cases, results):
        if message is None:
            assert out.returncode == 0, out.stderr[-2000:]
            assert (
                "no text encoder" in out.stdout and str(tmp_path / "ok.safetensors") in out.stdout
            )
            continue
        assert out.returncode == 1 and out.stderr.startswith("Error: "), (args, out.stderr[-1500:])
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-1500:]


def test_what_our_single_file_records_is_read_back_how_it_samples(tmp_path, ldm_ckpt, caplog):
    """A v-prediction model's single file loads as such (its metadata: the weights cannot show
    it), and a latent scale unlike SD's (a VAE trained here) is recorded, read back and said."""
    from sd_lightning.commands.open import load_sd_system
    from sd_lightning.weights.read import read_sd_vae
    from sd_lightning.weights.schedule import recorded

    folder, *_ = pipeline_folder(tmp_path, prediction="v_prediction")
    single = tmp_path / "v.safetensors"
    with caplog.at_level("WARNING"):
        _export(tmp_path, folder, "single_file", single)
    assert "latent scale" not in caplog.text  # SD's: nothing to say
    assert load_sd_system(str(single)).prediction == "v_prediction"
    assert recorded(str(single))["image_size"] == 64  # the folder's U-Net sample size, 8 x 8
    trained = tmp_path / "trained.safetensors"
    with caplog.at_level("WARNING"):
        _export(tmp_path, ldm_ckpt, "single_file", trained)
    scale = float(torch.load(ldm_ckpt, weights_only=True)["state_dict"]["latent_scale"])
    assert f"latent scale {scale:.5f}, not SD's 0.18215" in caplog.text
    assert read_sd_vae(str(trained), "vae_ckpt", "x").latent_scale == pytest.approx(scale)
