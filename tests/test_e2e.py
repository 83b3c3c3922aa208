"""REPA-E (stage=e2e): the latents' batch norm against torch's and across two gloo ranks; where
each loss's gradient goes, watched at each optimizer's step of a real run; exact resume; the
exports read by diffusers' AutoencoderKL and by vae_ckpt=; sampling from the checkpoint; two
DDP ranks; bad options and encoder folders refused before any work."""

from __future__ import annotations

import json
import os
import shutil

import lightning as L
import pytest
import torch
from conftest import (
    LDM_TINY,
    ROOT,
    compose_config,
    free_port,
    read_metrics,
    run_cli,
    straight_and_resumed,
)
from test_repa import TINY_DINO

from sd_lightning.core.errors import InputError
from sd_lightning.models.latent_norm import LatentNorm

E2E_TINY = [
    *[o for o in LDM_TINY if o != "stage=ldm"],
    "stage=e2e",
    "loss.discriminator.ndf=8",
    "loss.discriminator.n_layers=2",
    "loss.perceptual.trunk=random",
    "repa.resolution=56",
    "repa.hidden=32",
    "model.ema_decay=0.9",
]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A DINOv2 folder written by transformers' save_pretrained (3 heads of 16, 2 layers)."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("dino_e2e")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_DINO)).save_pretrained(root / "plain")
    return root / "plain"


def _e2e(dino, vae_ckpt, *more: str) -> list[str]:
    return [*E2E_TINY, f"repa.encoder={dino}", f"vae_ckpt={vae_ckpt}", *more]


def test_the_latent_norm_is_torchs_batch_norm_and_undoes_itself():
    torch.manual_seed(0)
    ours = LatentNorm(4)
    ref = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    for _ in range(3):
        z = torch.randn(5, 4, 3, 3) * torch.tensor([3.0, 0.5, 1.0, 7.0]).view(1, 4, 1, 1) + 2
        assert torch.allclose(ours(z), ref(z), atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    z = torch.randn(2, 4, 3, 3) * 4 + 1
    assert torch.allclose(ours(z), ref(z), atol=1e-5)
    assert torch.allclose(ours.denormalize(ours(z)), z, atol=1e-5)
    with pytest.raises(ValueError, match="latents have 3 channels, the norm 4"):
        ours(torch.randn(1, 3, 2, 2))


def _two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    z = torch.randn(6, 4, 3, 3) * 3 + 1  # the same on both: each rank takes its half
    norm = LatentNorm(4)
    for _ in range(2):
        y = norm(z[rank * 3 : (rank + 1) * 3])
    torch.save({"y": y, **norm.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_the_latent_norm_sums_its_statistics_over_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    torch.manual_seed(0)
    z = torch.randn(6, 4, 3, 3) * 3 + 1
    ref = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    for _ in range(2):
        whole = ref(z)  # one process, the whole batch
    for key in ("running_mean", "running_var"):
        assert torch.equal(ranks[0][key], ranks[1][key])  # equal on every rank
        assert torch.allclose(ranks[0][key], getattr(ref, key), atol=1e-5)
    assert torch.allclose(torch.cat([ranks[0]["y"], ranks[1]["y"]]), whole, atol=1e-5)


class StepWatch(L.Callback):
    """At each optimizer's step (torch's step pre-hooks), what the networks hold: the U-Net's
    weights against the batch's start, which parameters have gradients, a copy of them."""

    last: StepWatch | None = None  # the newest, for the test that ran it

    def __init__(self):
        self.seen: list[dict] = []
        StepWatch.last = self

    def on_train_batch_start(self, trainer, system, batch, batch_idx):
        self.start = {k: v.clone() for k, v in system.unet.state_dict().items()}
        self.vae_start = {k: v.clone() for k, v in system.vae.state_dict().items()}
        if batch_idx == 0:
            for name, opt in zip(("vae", "disc", "unet"), trainer.optimizers):
                opt.register_step_pre_hook(lambda o, a, k, name=name: self._see(system, name))

    def _see(self, system, name):
        def grads(net):
            return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

        unet_same = all(torch.equal(v, self.start[k]) for k, v in system.unet.state_dict().items())
        vae_same = all(
            torch.equal(v, self.vae_start[k]) for k, v in system.vae.state_dict().items()
        )
        self.seen.append(
            {"opt": name, "unet_same": unet_same, "vae_same": vae_same,
             "unet": grads(system.unet), "vae": grads(system.vae),
             "aligner": grads(system.aligner)}
        )  # fmt: skip


@pytest.mark.slow
def test_each_loss_reaches_only_its_networks_at_each_optimizer_step(
    tmp_path, data_dir, vae_ckpt, dino
):
    """The VAE's step: the U-Net frozen (no gradient, unchanged), the alignment's gradient in the
    encoder and not the decoder (measured against the same step with vae_align_weight=0); the
    U-Net's step: no gradient in the VAE (the diffusion loss sees detached latents)."""
    from sd_lightning.commands.train import train

    watched = {}
    for weight in (1.5, 0.0):
        cfg = compose_config(
            _e2e(
                dino, vae_ckpt, "trainer.max_steps=1", f"model.vae_align_weight={weight}",
                "+callbacks.watch._target_=test_e2e.StepWatch",
            ),
            tmp_path / f"w{weight}",
            data_dir,
        )  # fmt: skip
        train(cfg)
        watched[weight] = {s["opt"]: s for s in StepWatch.last.seen}
    vae, unet = watched[1.5]["vae"], watched[1.5]["unet"]
    assert watched[1.5]["disc"]["vae_same"] is False  # the VAE stepped before the discriminator
    assert vae["unet_same"] and not vae["unet"] and not vae["aligner"]  # the U-Net frozen
    assert unet["unet_same"]  # the VAE's and the discriminator's steps left the U-Net unchanged
    assert unet["unet"] and unet["aligner"] and not unet["vae"]  # nothing into the VAE
    without = watched[0.0]["vae"]["vae"]
    encoder = [k for k in vae["vae"] if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in vae["vae"] if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    assert any(not torch.allclose(vae["vae"][k], without[k]) for k in encoder)  # alignment's
    assert all(torch.allclose(vae["vae"][k], without[k], atol=1e-6) for k in decoder)


@pytest.mark.slow
def test_e2e_starts_from_a_stage2_checkpoint_as_its_config_records(
    tmp_path, data_dir, ldm_ckpt, dino
):
    """ldm_ckpt=: the U-Net's architecture from the checkpoint's config (not the unet= options
    given), its weights and EMA, and the VAE the stage-2 run trained on (no vae_ckpt=)."""
    from sd_lightning.commands.train import train

    overrides = [
        *E2E_TINY, f"repa.encoder={dino}", f"ldm_ckpt={ldm_ckpt}", "unet.model_channels=48",
        "trainer.max_steps=1", "+callbacks.watch._target_=test_e2e.StepWatch",
    ]  # fmt: skip
    cfg = compose_config(overrides, tmp_path / "run", data_dir)
    train(cfg)
    stage2 = torch.load(ldm_ckpt, weights_only=True)
    saved = stage2["sd_lightning"]["config"]
    assert cfg.unet.model_channels == saved["unet"]["model_channels"] == 32
    assert cfg.vae_ckpt == saved["vae_ckpt"]
    start = StepWatch.last.start  # the U-Net as the first step found it
    unet = {k[5:]: v for k, v in stage2["state_dict"].items() if k.startswith("unet.")}
    assert start.keys() == unet.keys() and all(torch.equal(start[k], unet[k]) for k in unet)
    vae = {k[4:]: v for k, v in stage2["state_dict"].items() if k.startswith("vae.")}
    assert all(torch.equal(StepWatch.last.vae_start[k], v) for k, v in vae.items())


@pytest.mark.slow
def test_e2e_starts_from_stable_diffusion_weights(tmp_path, data_dir, small_base, dino):
    """pretrained= (a diffusers folder): its U-Net, VAE and text encoder, as stage 2 reads them."""
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.commands.train import train

    overrides = [
        *[o for o in E2E_TINY if not o.startswith(("unet.", "text_encoder."))],
        f"repa.encoder={dino}", f"pretrained={small_base}", "trainer.max_steps=1",
        "+callbacks.watch._target_=test_e2e.StepWatch",
    ]  # fmt: skip
    train(compose_config(overrides, tmp_path / "run", data_dir))
    base = load_ldm(str(small_base))
    watched = StepWatch.last
    for start, net in ((watched.start, base.unet), (watched.vae_start, base.vae)):
        state = net.state_dict()
        assert start.keys() == state.keys()
        assert all(torch.equal(start[k], v) for k, v in state.items())
    assert (tmp_path / "run" / "export" / "vae_diffusers" / "config.json").is_file()


@pytest.mark.slow
def test_e2e_resumes_exactly_exports_the_tuned_vae_and_samples(tmp_path, data_dir, vae_ckpt, dino):
    """16 steps straight against 8 + 8 resumed: every tensor (U-Net, EMA, projector, VAE,
    discriminator, the norm's statistics) bit for bit; the VAE export read by diffusers'
    AutoencoderKL (same decoding, the statistics in its config) and by vae_ckpt=; the
    checkpoint samples without the encoder."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from sd_lightning.commands.open import load_ldm, load_vae

    overrides = _e2e(
        dino, vae_ckpt, "logger=csv", "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
    )  # fmt: skip
    a, b, through, resumed = straight_and_resumed(overrides, tmp_path, data_dir)
    assert a["global_step"] == b["global_step"] == 16 and a["sd_lightning"]["stage"] == "e2e"
    assert len(a["optimizer_states"]) == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    first = torch.load(resumed / "checkpoints" / "step00000004.ckpt", weights_only=True)
    for part in ("vae.encoder.conv_in.weight", "unet.out.2.weight", "latent_norm.running_mean"):
        assert not torch.equal(first["state_dict"][part], a["state_dict"][part]), part  # trains
    start = torch.load(vae_ckpt, weights_only=True)["state_dict"][
        "autoencoder.decoder.conv_out.weight"
    ]
    assert not torch.equal(start, a["state_dict"]["vae.decoder.conv_out.weight"])
    assert int(a["state_dict"]["latent_norm.num_batches_tracked"]) == 16
    rows = read_metrics(through)
    for metric in ("train/vae_align", "train/repa_align", "train/vae_rec", "train/vae_d_loss"):
        assert any(row.get(metric) for row in rows), metric

    state = a["state_dict"]
    mean = state["latent_norm.running_mean"]
    std = (state["latent_norm.running_var"] + 1e-4).sqrt()
    export = through / "export"
    theirs = AutoencoderKL.from_pretrained(export / "vae_diffusers").eval()
    assert theirs.config.scaling_factor == 1.0
    assert torch.allclose(torch.tensor(theirs.config.latents_mean), mean)
    assert torch.allclose(torch.tensor(theirs.config.latents_std), std)
    ours = load_vae(str(export / "vae.safetensors"))  # what vae_ckpt= reads
    vae_state = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    assert all(torch.equal(v, vae_state[k]) for k, v in ours.state_dict().items())
    torch.manual_seed(0)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(theirs.decode(z).sample, ours.decode(z), atol=1e-5)
    with safe_open(str(export / "vae.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["latents_mean"]) == pytest.approx(mean.tolist(), abs=1e-6)
    with safe_open(str(export / "ldm.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["latents_std"]) == pytest.approx(std.tolist(), abs=1e-6)
        assert not any(k.startswith("aligner") for k in f.keys())

    system = load_ldm(str(through / "checkpoints" / "last.ckpt"))  # no encoder, no loss
    assert type(system).__name__ == "EndToEndSystem" and system.aligner is None
    assert torch.equal(system.latent_norm.running_mean, mean)
    images = system.sample_images(["a red circle"], steps=2, guidance=2.0, sampler="ddim")
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()

    # stage=export: the normalisation folded into the VAE, at SD's scale, for every SD reader
    from sd_lightning.commands.export import export

    folder = tmp_path / "pipeline"
    ckpt = through / "checkpoints" / "last.ckpt"
    export(compose_config(["stage=export", f"ckpt={ckpt}", "format=diffusers", f"output={folder}"],
                          tmp_path / "x", data_dir))  # fmt: skip
    released = AutoencoderKL.from_pretrained(folder / "vae").eval()
    scale = released.config.scaling_factor
    assert scale == pytest.approx(0.18215)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs_z = released.encode(x).latent_dist.mode() * scale  # what a pipeline gives a U-Net
        ours_z = system.latent_norm(system.vae.encode(x).mode())
        assert torch.allclose(theirs_z, ours_z, atol=1e-4)
        assert torch.allclose(
            released.decode(ours_z / scale).sample, system.decode_latents(ours_z), atol=1e-4
        )


@pytest.mark.slow
def test_e2e_on_two_ddp_ranks_keeps_every_rank_equal(tmp_path, data_dir, vae_ckpt, dino):
    run = tmp_path / "run"
    out = run_cli(
        *[o for o in _e2e(dino, vae_ckpt) if not o.startswith(("logger=", "trainer="))],
        "trainer=debug",
        "logger=none",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=3",
        "+callbacks.probe._target_=probes.RankState",
        env={
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        },
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((run / f"state{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["latent_norm.num_batches_tracked"] == [3.0]
    for key in ranks[0]:
        if key != "rank":
            assert ranks[0][key] == ranks[1][key], key  # the statistics and the replicas


def test_e2e_options_and_encoder_folders_are_refused_before_any_work(
    tmp_path, data_dir, vae_ckpt, dino
):
    from sd_lightning.commands.preflight import check_training
    from sd_lightning.weights.vision import VisionEncoder

    def error(*overrides: str, vae: bool = True) -> str:
        chosen = [*E2E_TINY, f"repa.encoder={dino}", *([f"vae_ckpt={vae_ckpt}"] if vae else [])]
        if "repa=none" in overrides:  # nothing under repa. to set
            chosen = [o for o in chosen if not o.startswith("repa.")]
        cfg = compose_config([*chosen, *overrides], tmp_path / "run", data_dir)
        with pytest.raises(InputError) as caught:
            check_training(cfg)
        return str(caught.value)

    assert "stage=e2e needs vae_ckpt=" in error(vae=False)
    assert "not data=latents" in error("data=latents")
    assert "keep repa=urepa" in error("repa=none")
    assert "model.latent_norm.momentum=0" in error("model.latent_norm.momentum=0")
    assert "is a checkpoint of stage 'vae', not stage 'ldm'" in error(f"ldm_ckpt={vae_ckpt}")
    (tmp_path / "vae_folder").mkdir()
    (tmp_path / "vae_folder" / "config.json").write_text(json.dumps({"model_type": "vae"}))
    assert "not DINOv2" in error(f"repa.encoder={tmp_path / 'vae_folder'}")
    assert "trainer=fsdp is not supported" in error("trainer=fsdp")
    # a folder whose weights are another DINOv2's (one layer where config.json says two)
    from transformers import Dinov2Config, Dinov2Model

    mixed = tmp_path / "mixed"
    shutil.copytree(dino, mixed)
    Dinov2Model(Dinov2Config(**{**TINY_DINO, "num_hidden_layers": 1})).save_pretrained(
        tmp_path / "one"
    )
    shutil.copy(tmp_path / "one" / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(
        InputError, match="weights of the network its config.json describes are missing"
    ):
        VisionEncoder(str(mixed), resolution=56)
