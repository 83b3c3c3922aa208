"""Stage 2 in-process with a real Trainer: what is frozen stays frozen, EMA, latent scale,
checkpoints, and reproducible sampling."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.commands.open import load_ldm, load_vae
from sd_lightning.commands.train import train
from sd_lightning.weights.files import WeightFileError


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_moves_only_the_unet_and_the_ema_follows(ldm_cfg_factory):
    cfg = ldm_cfg_factory("trainer.max_steps=3", "model.ema_decay=0.5")
    system = instantiate(cfg.model)
    vae0, unet0 = _state(system.vae), _state(system.unet)
    text0 = _state(system.conditioner.text_encoder)
    assert torch.isnan(system.latent_scale)

    import lightning as L

    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    trainer.fit(system, datamodule=instantiate(cfg.data))

    assert trainer.global_step == 3
    for k, v in _state(system.vae).items():
        assert torch.equal(v, vae0[k]), f"frozen VAE weight {k} changed"
    for k, v in _state(system.conditioner.text_encoder).items():
        assert torch.equal(v, text0[k]), f"frozen text encoder weight {k} changed"
    moved = [k for k, v in _state(system.unet).items() if not torch.equal(v, unet0[k])]
    assert moved, "the U-Net did not train"
    ema, online = _state(system.ema.net), _state(system.unet)
    assert any(not torch.equal(ema[k], online[k]) for k in online), "EMA equals the online weights"
    assert any(not torch.equal(ema[k], unet0[k]) for k in online), "EMA never moved"
    assert int(system.ema.num_updates) == 3
    scale = float(system.latent_scale)
    assert 0 < scale < float("inf")  # estimated from the first batch
    # only the U-Net is optimized
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in system.unet.parameters()}


def test_checkpoint_samples_on_its_own_and_seeds_reproduce(ldm_cfg_factory, tmp_path):
    cfg = ldm_cfg_factory("trainer.max_steps=2")
    train(cfg)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    keys = checkpoint["state_dict"].keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("ema.net.") for k in keys)
    assert any(k.startswith("vae.") for k in keys)  # the frozen VAE rides along for sampling
    assert not any("text_encoder" in k for k in keys)  # OpenCLIP comes from its own weights
    saved_scale = float(checkpoint["state_dict"]["latent_scale"])

    system = load_ldm(str(last))
    assert float(system.latent_scale) == saved_scale  # used identically at sampling
    prompts = ["a red circle", "a blue square", "a red circle"]
    kwargs = dict(sampler="ddim", steps=3, guidance=3.0)
    a = system.sample_images(prompts, seeds=[5, 6, 7], **kwargs)
    b = system.sample_images(prompts, seeds=[5, 6, 7], **kwargs)
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[2])  # same prompt, another seed: another image
    alone = system.sample_images(prompts[2:], seeds=[7], **kwargs)
    torch.testing.assert_close(alone[0], a[2], atol=1e-5, rtol=0)  # independent of the batch
    for sampler in ("ddpm", "dpmpp_2m"):
        out = system.sample_images(prompts[:1], seeds=[1], sampler=sampler, steps=3)
        assert torch.isfinite(out).all()
    # a negative prompt per prompt: what each would get alone with its own
    negatives = ["a blue square", "", "a green triangle"]
    each = system.sample_images(prompts, seeds=[5, 6, 7], negative_prompt=negatives, **kwargs)
    torch.testing.assert_close(each[1], a[1], atol=1e-5, rtol=0)  # "" is the default
    third = system.sample_images(prompts[2:], seeds=[7], negative_prompt=negatives[2], **kwargs)
    torch.testing.assert_close(each[2], third[0], atol=1e-5, rtol=0)
    assert not torch.allclose(each[2], a[2])


def test_stage2_refuses_a_wrong_or_missing_vae_checkpoint(ldm_cfg_factory, tmp_path, vae_ckpt):
    with pytest.raises(WeightFileError, match="vae_ckpt='/nope.ckpt' does not exist: give the"):
        load_vae("/nope.ckpt")
    cfg = ldm_cfg_factory("trainer.max_steps=1")
    train(cfg)
    ldm_ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="stage 'ldm', not stage 'vae'"):
        load_vae(str(ldm_ckpt))
    with pytest.raises(ValueError, match="stage 'vae', not stage 'ldm'"):
        load_ldm(str(vae_ckpt))
    with pytest.raises(
        ValueError, match="ckpt_path='.*' is a checkpoint of stage 'vae', not stage 'ldm'"
    ):
        train(
            ldm_cfg_factory("trainer.max_steps=2", f"ckpt_path={vae_ckpt}")
        )  # resume: stage 2 only
    export = vae_ckpt.parent.parent / "export" / "vae.safetensors"
    vae = load_vae(str(export))  # the safetensors export works as well
    assert not any(p.requires_grad for p in vae.parameters())


def test_zero_terminal_snr_needs_v_prediction(ldm_cfg_factory):
    cfg = ldm_cfg_factory("model.schedule.zero_terminal_snr=true")
    with pytest.raises(Exception, match="needs model.prediction=v_prediction"):
        instantiate(cfg.model)
    cfg = ldm_cfg_factory(
        "model.schedule.zero_terminal_snr=true",
        "model.prediction=v_prediction",
        "model.min_snr_gamma=5.0",
        "model.offset_noise=0.1",
        "trainer.max_steps=1",
        "model.val_sampler.spacing=trailing",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_resume_continues_steps_ema_and_keeps_the_latent_scale(ldm_cfg_factory, tmp_path):
    train(ldm_cfg_factory("trainer.max_steps=2"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    train(ldm_cfg_factory("trainer.max_steps=4", f"ckpt_path={last}"))
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["global_step"] == 4
    assert int(second["state_dict"]["ema.num_updates"]) == 4  # 2 before, 2 after the resume
    scale = first["state_dict"]["latent_scale"]
    assert torch.equal(second["state_dict"]["latent_scale"], scale)  # not estimated again
    assert second["sd_lightning"]["skipped"] == first["sd_lightning"]["skipped"]


@pytest.mark.slow
def test_compile_option_trains_like_eager_and_keeps_checkpoint_names(ldm_cfg_factory, tmp_path):
    """model.compile=true: the U-Net's layers run compiled (Inductor on the CPU here), the loss
    of each step is the eager one, and checkpoint keys keep the single-file names."""
    from torch._dynamo.utils import counters

    results, graphs = {}, {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        cfg = ldm_cfg_factory("trainer.max_steps=3", f"model.compile={compiled}")
        cfg.paths.output_dir = str(run)
        torch._dynamo.reset()
        counters.clear()
        try:
            train(cfg)
            graphs[compiled] = counters["stats"]["unique_graphs"]
        finally:
            torch._dynamo.reset()
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        results[compiled] = state
    assert graphs[False] == 0 and graphs[True] >= 4  # ResNet blocks, transformers, down/up
    assert results[True].keys() == results[False].keys()  # no _orig_mod in any name
    for key, value in results[False].items():
        torch.testing.assert_close(results[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_zero_terminal_snr_runs_sample_from_the_last_step_everywhere(ldm_cfg_factory):
    cfg = ldm_cfg_factory(
        "model.schedule.zero_terminal_snr=true",
        "model.prediction=v_prediction",
        "model.latent_scale=1",
    )
    system = instantiate(cfg.model).eval()
    assert cfg.model.val_sampler.spacing is None  # the validation grid takes the default
    kwargs = dict(seeds=[3], sampler="ddim", steps=2, guidance=1.0)
    default = system.sample_images(["a red circle"], **kwargs)
    trailing = system.sample_images(["a red circle"], spacing="trailing", **kwargs)
    leading = system.sample_images(["a red circle"], spacing="leading", **kwargs)
    torch.testing.assert_close(default, trailing)
    assert not torch.allclose(default, leading)


def test_sampling_defaults_to_the_size_the_unet_trained_at(ldm_ckpt, tmp_path):
    checkpoint = torch.load(ldm_ckpt, weights_only=True)
    meta = checkpoint["sd_lightning"]
    assert meta["vae_config"]["resolution"] == 32
    meta["config"]["data"]["image_size"] = 64  # a U-Net trained at 64 px on a 32 px VAE
    torch.save(checkpoint, tmp_path / "at64.ckpt")
    system = load_ldm(str(tmp_path / "at64.ckpt"))
    images = system.sample_images(["a red circle"], seeds=[0], steps=1, guidance=1.0)
    assert images.shape[-2:] == (64, 64)


def test_guidance_combines_in_float32_whatever_the_networks_dtype():
    from sd_lightning.diffusion.guidance import GuidedNet

    def net(x, t, context):  # conditional 1 + 2**-7, unconditional 1, as bf16 outputs
        return torch.where(context[:, :1, :1, None] > 0, 1.0078125, 1.0).expand_as(x).bfloat16()

    guided = GuidedNet(net, uncond=-torch.ones(1, 2, 3), scale=7.5)
    out = guided(torch.zeros(1, 4, 2, 2), torch.tensor([5]), torch.ones(1, 2, 3))
    assert out.dtype == torch.float32
    assert torch.all(out == 1 + 7.5 * 2**-7)  # bf16 would give 1.0547 or 1.0625
