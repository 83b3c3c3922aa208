"""U-REPA (repa=urepa): the head and losses, DINOv2 folders read through transformers (with and
without registers, a wrong kind refused), and a real tiny run that trains the projector with the
U-Net, resumes exactly, exports without it and samples without the encoder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LDM_TINY, compose_config, straight_and_resumed

from sd_lightning.core.errors import InputError
from sd_lightning.models.alignment import UNetAlignment, alignment_loss, manifold_loss

# a DINOv2 unlike ViT-B/14's defaults: 3 heads of 16, 2 layers, MLP ratio 3, layer scale 0.5
TINY_DINO = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "mlp_ratio": 3,
    "layerscale_value": 0.5,
    "patch_size": 14,
    "image_size": 56,
}


def test_the_head_projects_then_upsamples_and_the_losses_have_their_optima():
    torch.manual_seed(0)
    head = UNetAlignment(channels=8, out_dim=6, hidden=16)
    features = torch.randn(2, 8, 2, 2)
    tokens = head(features, (4, 4))
    assert tokens.shape == (2, 16, 6)
    projected = head.mlp(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # U-REPA: MLP first
    upsampled = F.interpolate(projected, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(tokens, upsampled.flatten(2).transpose(1, 2), atol=1e-6)
    other_order = head.mlp(
        F.interpolate(features, size=(4, 4), mode="bilinear").permute(0, 2, 3, 1)
    )
    assert not torch.allclose(tokens, other_order.flatten(1, 2), atol=1e-3)
    target = torch.randn(2, 16, 6)
    assert alignment_loss(target * 3, target) == pytest.approx(-1.0, abs=1e-6)
    assert manifold_loss(target * 3, target) == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(tokens, target) > -1 and manifold_loss(tokens, target) > 0
    alignment_loss(tokens, target).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.fixture(scope="module")
def dino_folders(tmp_path_factory):
    """DINOv2 folders written by transformers' own save_pretrained: plain, and with registers."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    root = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_DINO)).save_pretrained(root / "plain")
    config = Dinov2WithRegistersConfig(num_register_tokens=2, **TINY_DINO)
    Dinov2WithRegistersModel(config).save_pretrained(root / "registers")
    return root


@pytest.mark.parametrize("kind,registers", [("plain", 0), ("registers", 2)])
def test_dinov2_folders_give_the_patch_tokens_as_repa_prepares_them(dino_folders, kind, registers):
    from transformers import AutoModel

    from sd_lightning.weights.vision import MEAN, STD, VisionEncoder

    encoder = VisionEncoder(str(dino_folders / kind), resolution=56)
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 48) and encoder.grid == (4, 4)
    net = AutoModel.from_pretrained(dino_folders / kind).eval()
    x = ((images + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    x = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = net(pixel_values=x).last_hidden_state[:, 1 + registers :]
    assert torch.allclose(tokens, expected, atol=1e-5)


TIMM_KW = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=3.0, init_values=0.5)  # not ViT-B's


@pytest.mark.parametrize(
    "name,registers,layout",
    [("vit_small_patch14_dinov2", 0, "pth"), ("vit_small_patch14_reg4_dinov2", 4, "safetensors")],
)
def test_dinov2_weight_files_are_read_through_timm(tmp_path, name, registers, layout):
    """A weights file (timm's layout, or the original release's .pth with its mask token) read
    by timm at the alignment's grid: the patch tokens equal timm's own model's on images
    prepared as REPA prepares them, the position embeddings resampled from a 7 x 7 grid."""
    import timm
    from safetensors.torch import save_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    from sd_lightning.weights.vision import MEAN, STD, VisionEncoder

    torch.manual_seed(0)
    source = timm.create_model(name, pretrained=False, num_classes=0, img_size=98, **TIMM_KW)
    state = source.state_dict()
    if layout == "pth":
        state = {**state, "mask_token": torch.zeros(1, 48)}
        path = tmp_path / "dinov2_vits14_pretrain.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    encoder = VisionEncoder(str(path), resolution=56, timm_model=name, timm_kwargs=TIMM_KW)
    assert encoder.grid == (4, 4) and encoder.dim == 48 and encoder.registers == registers
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 48)
    reference = timm.create_model(name, pretrained=False, num_classes=0, img_size=56, **TIMM_KW)
    reference.load_state_dict(checkpoint_filter_fn(dict(state), reference))
    x = ((images + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    x = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = reference.eval().forward_features(x)[:, 1 + registers :]
    assert torch.allclose(tokens, expected, atol=1e-5)
    wider = {**TIMM_KW, "embed_dim": 60, "num_heads": 4}
    with pytest.raises(InputError, match="does not fit vit_small"):
        VisionEncoder(str(path), resolution=56, timm_model=name, timm_kwargs=wider)
    deeper = {**TIMM_KW, "depth": 3}
    with pytest.raises(InputError, match="weights missing"):
        VisionEncoder(str(path), resolution=56, timm_model=name, timm_kwargs=deeper)


def test_a_weights_file_that_holds_no_vit_is_refused(tmp_path, vae_ckpt):
    from safetensors.torch import save_file

    from sd_lightning.weights.vision_timm import check_vit_file

    path = tmp_path / "vae.safetensors"
    state = torch.load(vae_ckpt, weights_only=True)["state_dict"]
    save_file({k[12:]: v for k, v in state.items() if k.startswith("autoencoder.")}, str(path))
    with pytest.raises(InputError, match="holds a VAE, not a ViT's weights"):
        check_vit_file(str(path))


def test_an_encoder_folder_of_another_kind_or_none_is_refused(tmp_path, dino_folders):
    from sd_lightning.weights.vision import VisionEncoder

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(InputError, match="'clip_vision_model' model, not DINOv2"):
        VisionEncoder(str(tmp_path / "clip"))
    with pytest.raises(InputError, match="no config.json there"):
        VisionEncoder(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="multiple of the encoder's patch"):
        VisionEncoder(str(dino_folders / "plain"), resolution=50)


def _repa(encoder: str) -> list[str]:
    return ["repa=urepa", f"repa.encoder={encoder}", "repa.resolution=56", "repa.hidden=32"]


def test_repa_options_are_checked_before_anything_is_built(tmp_path, data_dir, vae_ckpt):
    from sd_lightning.commands.preflight import check_training

    def error(*overrides: str) -> str:
        cfg = compose_config([*LDM_TINY, f"vae_ckpt={vae_ckpt}", *overrides], tmp_path, data_dir)
        with pytest.raises(InputError) as caught:
            check_training(cfg)
        return str(caught.value)

    assert "needs repa.encoder=" in error("repa=urepa")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"model_type": "autoencoder_kl"}))
    assert "not DINOv2" in error(*_repa(str(tmp_path / "vae")))
    assert "trainer=fsdp is not supported" in error(*_repa("random"), "trainer=fsdp")
    assert "repa.weight=-1" in error(*_repa("random"), "repa.weight=-1")


@pytest.mark.slow
def test_urepa_trains_resumes_exactly_exports_and_samples_without_the_encoder(
    tmp_path, data_dir, vae_ckpt, dino_folders
):
    from sd_lightning.commands.open import load_ldm

    overrides = [
        *LDM_TINY,
        f"vae_ckpt={vae_ckpt}",
        *_repa(str(dino_folders / "plain")),
        "repa.manifold_weight=3.0",
        "model.ema_decay=0.9",
        "logger=csv",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=4",
    ]
    a, b, through, resumed = straight_and_resumed(overrides, tmp_path, data_dir)
    aligner = [k for k in a["state_dict"] if k.startswith("aligner.")]
    assert aligner and b["global_step"] == a["global_step"] == 16
    for key, value in a["state_dict"].items():  # the projector and the U-Net: bit for bit
        assert torch.equal(value, b["state_dict"][key]), key
    first = torch.load(resumed / "checkpoints" / "step00000004.ckpt", weights_only=True)
    assert not torch.equal(first["state_dict"][aligner[0]], a["state_dict"][aligner[0]])  # trains
    rows = (through / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/repa_align" in rows and "train/repa_manifold" in rows

    from safetensors import safe_open

    with safe_open(str(through / "export" / "ldm.safetensors"), "pt") as f:
        assert not any("aligner" in k for k in f.keys())
    system = load_ldm(str(through / "checkpoints" / "last.ckpt"))  # no encoder needed
    assert system.aligner is None
    images = system.sample_images(["a red circle"], steps=2, guidance=2.0, sampler="ddim")
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
def test_urepa_features_precomputed_into_latent_shards_train_without_images(
    tmp_path, data_dir, vae_ckpt, dino_folders
):
    """stage=encode repa=urepa stores the encoder's patch tokens (.repa.npy) beside the latents;
    stage=ldm data=latents repa=urepa aligns with them; shards without them: a clear error."""
    import io
    from collections import Counter

    import numpy as np
    from conftest import DATA_TINY, read_metrics

    from sd_lightning.commands.encode import encode
    from sd_lightning.commands.train import train
    from sd_lightning.data.tar import shard_samples

    text = [o for o in LDM_TINY if o.startswith("text_encoder.")]
    encoder = str(dino_folders / "plain")

    def encoded(name: str, *repa: str) -> str:
        cfg = compose_config(
            [
                "stage=encode",
                *DATA_TINY,
                *text,
                f"vae_ckpt={vae_ckpt}",
                f"output={tmp_path / name}",
                *repa,
            ],
            tmp_path / f"encode_{name}",
            data_dir,
        )
        return encode(cfg)["urls"]

    with_features = encoded("with", *_repa(encoder))
    shard = sorted((tmp_path / "with").glob("*.tar"))[0]
    first = next(iter(shard_samples([str(shard)], Counter())))
    assert np.load(io.BytesIO(first["repa.npy"])).shape == (16, 48)  # 4 x 4 patches, 48 wide

    latents = [
        *LDM_TINY,
        "data=latents",
        f"vae_ckpt={vae_ckpt}",
        "logger=csv",
        "trainer.max_steps=2",
    ]
    run = tmp_path / "ldm"
    train(
        compose_config([*latents, f"data.urls='{with_features}'", *_repa(encoder)], run, data_dir)
    )
    assert any(row.get("train/repa_align") for row in read_metrics(run))

    without = encoded("without")
    with pytest.raises(InputError, match="encode them with stage=encode repa=urepa"):
        train(
            compose_config(
                [*latents, f"data.urls='{without}'", *_repa(encoder)], tmp_path / "x", data_dir
            )
        )
