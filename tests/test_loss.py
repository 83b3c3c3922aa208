"""The stage-1 loss against its definition, and the two optimizers in a real Trainer."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.losses import AutoencoderLoss, adaptive_weight, build_lpips
from sd_lightning.models import AutoencoderKL, NLayerDiscriminator


@pytest.fixture(scope="module")
def lpips_random():
    return build_lpips("random")


def _setup(disc_start=0, perceptual=None, seed=0):
    torch.manual_seed(seed)
    ae = AutoencoderKL(ch=16, ch_mult=(1, 2), num_res_blocks=1, resolution=16, norm_groups=8)
    loss = AutoencoderLoss(
        NLayerDiscriminator(ndf=8, n_layers=1), perceptual, disc_start=disc_start
    )
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return ae, loss, x


def test_adaptive_weight_matches_its_definition():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(5, 4)
    y = h @ w
    nll, g = (y**2).sum(), -(y.sin()).mean()
    got = adaptive_weight(nll, g, w)
    # by hand: d(nll)/dw = 2 h^T y ; d(g)/dw = -h^T cos(y) / numel
    grad_nll = 2 * h.T @ y
    grad_g = -h.T @ y.cos() / y.numel()
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(got, expected.detach().clamp(0, 1e4))
    assert not got.requires_grad


def test_adaptive_weight_is_finite_when_gradients_vanish():
    w = torch.randn(3, requires_grad=True)
    nll = (w * 2).sum()
    g = (w * 0.0).sum()  # generator gradient exactly zero
    assert torch.isfinite(adaptive_weight(nll, g, w, max_weight=1e4))
    assert adaptive_weight(nll, g, w, max_weight=1e4) == 1e4
    nan_g = (w * float("nan")).sum()
    assert adaptive_weight(nll, nan_g, w) == 0.0


def test_discriminator_terms_are_zero_before_disc_start():
    ae, loss, x = _setup(disc_start=10)
    recon, post = ae(x)
    total, logs = loss.generator_loss(x, recon, post, step=9, last_layer=ae.last_layer)
    assert logs["g_loss"] == 0 and logs["d_weight"] == 0 and logs["disc_factor"] == 0
    torch.testing.assert_close(total, logs["nll"] + loss.kl_weight * logs["kl"])
    d_loss, _ = loss.discriminator_loss(x, recon.detach(), step=9)
    assert d_loss == 0
    _, logs_on = loss.generator_loss(x, recon, post, step=10, last_layer=ae.last_layer)
    assert logs_on["g_loss"] != 0 and logs_on["d_weight"] > 0


@pytest.mark.parametrize("learn", [False, True])
def test_logvar_is_fixed_by_default_and_trained_when_asked(cfg_factory, learn):
    """Stability's default (learn_logvar=False): the log-variance stays at its initial value and
    out of the optimizer; learned, it gets gradients and an optimizer slot."""
    ae, _, x = _setup()
    loss = AutoencoderLoss(NLayerDiscriminator(ndf=8, n_layers=1), learn_logvar=learn)
    recon, post = ae(x)
    total, _ = loss.generator_loss(x, recon, post, step=0, last_layer=ae.last_layer)
    total.backward()
    assert (loss.logvar.grad is not None and loss.logvar.grad != 0) == learn
    system = instantiate(cfg_factory(f"loss.learn_logvar={learn}").model)
    assert system.loss.learn_logvar == learn
    opt_ae, _ = system.configure_optimizers()
    optimized = any(p is system.loss.logvar for g in opt_ae.param_groups for p in g["params"])
    assert optimized == learn


def test_lpips_gradients_reach_the_reconstruction(lpips_random):
    ae, loss, x = _setup(perceptual=lpips_random)
    recon = torch.zeros_like(x, requires_grad=True)
    rec, _ = loss.reconstruction(x, recon)
    rec.sum().backward()
    l1_only = torch.sign(recon - x).abs().sum()
    assert recon.grad is not None and recon.grad.abs().sum() != l1_only  # LPIPS adds its own part
    assert not any(p.requires_grad for p in lpips_random.parameters())
    assert not any("perceptual" in k for k in loss.state_dict())  # frozen LPIPS stays out of ckpts


def test_real_lpips_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache and no network here
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips("imagenet", weights_path=str(tmp_path / "missing.pth"))


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _changed(before, module):
    after = _params(module)
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("disc_start", [0, 100])
def test_both_optimizers_step_once_the_discriminator_started(cfg_factory, disc_start):
    cfg = cfg_factory(
        f"loss.disc_start={disc_start}",
        f"loss.learn_logvar={disc_start == 0}",  # learned in one run, fixed (the default) in the other
        "trainer.max_steps=3",
        "callbacks=none",
    )
    system = instantiate(cfg.model)
    data = instantiate(cfg.data)
    ae0, disc0 = _params(system.autoencoder), _params(system.loss.discriminator)
    logvar0 = system.loss.logvar.detach().clone()
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(system, datamodule=data)
    assert trainer.global_step == 3  # autoencoder steps; the discriminator's are not counted
    assert _changed(ae0, system.autoencoder), "the autoencoder did not train"
    learned = system.loss.logvar.detach() != logvar0
    assert learned == (disc_start == 0), "logvar trained only where loss.learn_logvar=true"
    disc_weights = [k for k in disc0 if "running" not in k]
    moved = [k for k in _changed(disc0, system.loss.discriminator) if k in disc_weights]
    if disc_start == 0:
        assert moved, "the discriminator did not train after disc_start"
    else:
        assert not moved, "the discriminator trained before disc_start"


def test_real_lpips_with_an_empty_cache_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a dead proxy: the download can never happen
    with pytest.raises(FileNotFoundError) as err:
        build_lpips("imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "weights_path" in msg and "trunk=random" in msg


def test_gradient_accumulation_steps_once_per_n_batches(cfg_factory):
    cfg = cfg_factory(
        "model.accumulate_grad_batches=2",
        "trainer.max_steps=2",
        "callbacks=none",
        "trainer.limit_val_batches=0",
    )
    system, data = instantiate(cfg.model), instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(system, datamodule=data)
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4


def test_pixel_loss_l2_is_squared_error():
    ae, loss, x = _setup()
    loss.pixel_loss = "l2"
    recon = torch.zeros_like(x)
    torch.testing.assert_close(loss.reconstruction(x, recon)[0], x.pow(2))
    with pytest.raises(ValueError, match="loss.pixel_loss must be 'l1' or 'l2', got 'huber'"):
        AutoencoderLoss(NLayerDiscriminator(), pixel_loss="huber")


def test_bf16_mixed_precision_trains_both_networks(cfg_factory):
    """The same manual-optimization path as on A100/H100s, under CPU bf16 autocast."""
    cfg = cfg_factory(
        "trainer.precision=bf16-mixed", "loss.disc_start=0", "trainer.max_steps=2", "callbacks=none"
    )
    system, data = instantiate(cfg.model), instantiate(cfg.data)
    ae0, disc0 = _params(system.autoencoder), _params(system.loss.discriminator)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(system, datamodule=data)
    assert _changed(ae0, system.autoencoder) and _changed(disc0, system.loss.discriminator)
    assert all(torch.isfinite(p).all() for p in system.parameters())
    assert next(system.autoencoder.parameters()).dtype == torch.float32  # master weights stay fp32


def test_imagenet_trunk_loads_torchvision_vgg16_weights_from_a_file(tmp_path):
    """The real loading path, fed a torchvision VGG16 state dict (random weights, same format)."""
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    model = build_lpips("imagenet", weights_path=str(path))
    torch.testing.assert_close(model.net.slice1[0].weight, vgg.features[0].weight)
    torch.testing.assert_close(getattr(model.net.slice5, "28").bias, vgg.features[28].bias)
    assert not any(p.requires_grad for p in model.parameters())
