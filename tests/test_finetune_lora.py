"""``finetune=lora``: adapters trained on a diffusers-written tiny pipeline, checkpoints that hold
only them, resumed bit-exactly, and exported files that diffusers' own ``load_lora_weights`` reads
into the same U-Net function (the oracle, test-only)."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA_TINY, compose_config
from safetensors.torch import load_file

from sd_lightning.core.errors import InputError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

LORA = [
    *DATA_TINY,
    "experiment=lora",
    "finetune.rank=4",
    "finetune.alpha=8",
    "model.optimizer.lr=3e-2",  # adapters far from zero after a few steps: a test that can fail
    "model.val_prompts=['a red circle']",
    "model.val_sampler.steps=2",
]


@pytest.fixture(scope="module")
def base(small_base):
    return small_base


def _train(run, data_dir, base, *more):
    from sd_lightning.commands.train import train

    return train(compose_config([*LORA, f"pretrained={base}", *more], run, data_dir))


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 64)


def test_lora_checkpoints_hold_the_adapters_and_diffusers_loads_both_exports(
    tmp_path, data_dir, base
):
    from sd_lightning.commands.open import apply_loras, load_ldm

    run = tmp_path / "run"
    _train(run, data_dir, base, "trainer.max_steps=3")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys - {"latent_scale"} and all(".lora_" in k for k in keys - {"latent_scale"})
    assert ckpt["sd_lightning"]["base"]["sha256"]  # which base weights the adapters belong to
    system = load_ldm(run / "checkpoints" / "last.ckpt")  # base from its folder + adapters
    x, t, ctx = _inputs()
    with torch.no_grad():
        ours = system.unet(x, t, ctx)
        base_out = load_ldm(str(base)).unet(x, t, ctx)
    assert (ours - base_out).abs().max() > 1e-3  # the adapters changed the function
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
        pipe.load_lora_weights(str(run / "export"), weight_name=name)
        with torch.no_grad():
            theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4, msg=name)
    kohya = load_file(run / "export" / "lora.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in kohya)
    assert float(next(v for k, v in kohya.items() if k.endswith(".alpha"))) == 8.0
    # sampling: the LoRA file merged into the base equals the checkpoint's adapters
    merged = load_ldm(str(base))
    apply_loras(merged, [str(run / "export" / "lora.safetensors")], 1.0)
    with torch.no_grad():
        torch.testing.assert_close(merged.unet(x, t, ctx), ours, atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="lora_scale has 2 values for 1 LoRA files"):
        apply_loras(merged, [str(run / "export" / "lora.safetensors")], [1.0, 0.5])


def test_a_text_encoder_lora_exports_what_diffusers_loads_into_both_networks(
    tmp_path, data_dir, base
):
    from sd_lightning.commands.open import apply_loras, load_ldm

    run = tmp_path / "run"
    _train(run, data_dir, base, "trainer.max_steps=3", "finetune.text_encoder=true")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    text = [k for k in state if k.startswith("text_tower.")]
    assert text and all(".lora_" in k for k in text)  # the tower's adapters, not its weights
    system = load_ldm(run / "checkpoints" / "last.ckpt")
    prompt = ["a red circle at the top left"]
    x, t, ctx = _inputs()
    with torch.no_grad():
        ours_text, ours_unet = system.encode_text(prompt), system.unet(x, t, ctx)
        base_text = load_ldm(str(base)).encode_text(prompt)
    assert (ours_text - base_text).abs().max() > 1e-3  # the text adapters changed the states
    kohya = load_file(run / "export" / "lora.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
        pipe.load_lora_weights(str(run / "export"), weight_name=name)
        with torch.no_grad():
            theirs_text, _ = pipe.encode_prompt(prompt[0], "cpu", 1, False)
            theirs_unet = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(theirs_text, ours_text, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(theirs_unet, ours_unet, atol=1e-5, rtol=1e-4, msg=name)
    # the file merged into the base (sampling with lora=...) and the run's own merged adapters
    for model, files in (
        (load_ldm(str(base)), [str(run / "export" / "lora.safetensors")]),
        (system, []),
    ):
        apply_loras(model, files, 1.0)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(prompt), ours_text, atol=1e-5, rtol=1e-4)


def test_a_text_encoder_lora_on_latent_shards_trains_the_text_adapters(tmp_path, data_dir, base):
    """Stored text states cannot train the text encoder's adapters: with them trained, captions
    are encoded in every step (the exported up-weights leave zero)."""
    from sd_lightning.commands.encode import encode

    latents = tmp_path / "latents"
    written = encode(
        compose_config(
            [
                *[o for o in DATA_TINY if not o.startswith("logger=")],
                "stage=encode",
                f"vae_ckpt={base}",
                "text_encoder=clip_vit_l",
                f"text_encoder.pretrained={base}",
                "text_encoder.layer=auto",
                f"output={latents}",
                "dtype=float32",
            ],
            tmp_path / "encode",
            data_dir,
        )
    )
    urls = written["urls"]
    _train(
        tmp_path / "run",
        data_dir,
        base,
        "trainer.max_steps=2",
        "finetune.text_encoder=true",
        "data=latents",
        f"data.urls='{urls}'",
        "data.val_shards=0",
        "data.image_size=32",
    )
    kohya = load_file(tmp_path / "run" / "export" / "lora.safetensors")
    ups = [v for k, v in kohya.items() if k.startswith("lora_te_") and ".lora_up." in k]
    assert ups and all(v.abs().max() > 0 for v in ups)


def test_a_lora_run_resumes_bit_exactly(tmp_path, data_dir, base):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    epoch = "data.samples_per_epoch=8"  # 2 steps an epoch: the stop falls on an epoch boundary
    _train(straight, data_dir, base, "trainer.max_steps=4", epoch)
    _train(resumed, data_dir, base, "trainer.max_steps=2", epoch)
    _train(resumed, data_dir, base, "trainer.max_steps=4", epoch)
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lora_needs_base_weights(tmp_path):
    from conftest import run_cli

    out = run_cli("experiment=lora", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 1
    assert (
        "Error: a fine-tuning method (finetune=...) trains on base weights: give pretrained="
        in (out.stderr)
    )


@pytest.mark.slow
def test_lora_under_fsdp_matches_ddp_and_its_sharded_checkpoint_exports_merged(
    tmp_path, data_dir, base
):
    from conftest import run_cli_all

    def command(strategy: str) -> list[str]:
        return [
            *[o for o in LORA if not o.startswith(("logger=", "trainer="))],
            f"trainer={strategy}",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "logger=csv",
            f"pretrained={base}",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={tmp_path / strategy}",
        ]

    results = run_cli_all([command("fsdp"), command("ddp")], timeout=300)
    for out in results:
        assert out.returncode == 0, out.stderr[-3000:]
    fsdp, ddp = (load_file(tmp_path / s / "export" / "lora.safetensors") for s in ("fsdp", "ddp"))
    assert fsdp.keys() == ddp.keys() and len(fsdp) > 0
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the sharded checkpoint (adapters only, one shard per rank) exports a whole model: the
    # base with the adapters merged, as diffusers applies the exported LoRA file
    last = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    from sd_lightning.commands.export import export

    out = tmp_path / "merged"
    export(
        compose_config(
            ["stage=export", f"ckpt={last}", "format=diffusers", f"output={out}"],
            tmp_path / "e",
            data_dir,
        )
    )
    merged = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "fsdp" / "export"), weight_name="lora.safetensors")
    x, t, ctx = _inputs()
    with torch.no_grad():
        expected = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(
            merged(x, t, encoder_hidden_states=ctx).sample, expected, atol=1e-5, rtol=1e-4
        )
