"""On a CUDA GPU (skipped without one): both stages from the CLI with ``trainer=gpu`` in bf16, at
the tiny size and at Stable Diffusion's size (256 px), ``trainer=fsdp`` on one GPU,
``model.compile=true``, sampling and ``stage=encode``. ``make gpu-suite`` runs these first, one
test per pytest-xdist worker."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import DATA_TINY, LDM_TINY, TINY, read_metrics, run_cli

from sd_lightning.commands.open import save_vae
from sd_lightning.models import AutoencoderKL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = [
    "trainer=gpu",
    "trainer.max_steps=3",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
]
VAE_TINY = [o for o in TINY if not o.startswith(("trainer=", "logger="))] + GPU + ["logger=csv"]
LDM_GPU = [o for o in LDM_TINY if not o.startswith(("trainer=", "logger="))] + GPU + ["logger=csv"]
TEXT_TINY = [o for o in LDM_TINY if o.startswith("text_encoder.")]


def _ok(out, what: str) -> str:
    assert out.returncode == 0, f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    log = out.stdout + out.stderr
    assert "Traceback" not in log, log[-4000:]
    return log


def _losses_finite(run) -> list[float]:
    losses = [float(r["train/loss"]) for r in read_metrics(run) if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses), losses
    return losses


def _on_gpu_in_bf16(log: str) -> None:
    assert re.search(r"GPU available: True \(cuda\), used: True", log), log[-3000:]
    assert "bf16" in log, "trainer=gpu should train in bf16-mixed"


def _random_vae_export(path, resolution: int = 32):
    vae = AutoencoderKL(ch=16, ch_mult=[1, 2, 2], norm_groups=8, resolution=resolution)
    return save_vae(vae, str(path))


def test_tiny_stages_sampling_and_encoding_on_gpu(tmp_path):
    data = f"paths.data_dir={tmp_path / 'data'}"
    vae_run, ldm_run = tmp_path / "vae", tmp_path / "ldm"
    log = _ok(run_cli(*VAE_TINY, data, f"hydra.run.dir={vae_run}"), "stage=vae")
    _on_gpu_in_bf16(log)
    _losses_finite(vae_run)
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"

    log = _ok(
        run_cli(*LDM_GPU, data, f"vae_ckpt={vae_ckpt}", f"hydra.run.dir={ldm_run}"), "stage=ldm"
    )
    _on_gpu_in_bf16(log)
    _losses_finite(ldm_run)
    assert (ldm_run / "export" / "ldm.safetensors").is_file()

    samples = tmp_path / "samples"
    out = run_cli(
        "stage=sample",
        f"ckpt={ldm_run / 'checkpoints' / 'last.ckpt'}",
        "prompts=['a red circle','a blue square']",
        "steps=4",
        f"hydra.run.dir={samples}",
    )
    _ok(out, "stage=sample")
    assert len(list(samples.glob("0*.png"))) == 2 and (samples / "grid.png").is_file()

    # stage=eval on the GPU: bf16 generation, Inception and CLIP on the device (random weights)
    shards = sorted(str(p) for p in (tmp_path / "data").glob("demo-*/train-*.tar"))
    out = run_cli(
        "stage=eval",
        f"ckpt={ldm_run / 'checkpoints' / 'last.ckpt'}",
        f"eval.prompts={shards[0]}",
        f"eval.reference={'::'.join(shards)}",
        "eval.num_images=16",
        "eval.guidance=[1,3]",
        "eval.feature_dim=64",
        "eval.allow_few=true",
        "eval.inception=random",
        "eval.clip.model=ViT-B-32",
        "eval.clip.pretrained=random",
        "steps=4",
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        f"eval.stats_dir={tmp_path / 'stats'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    _ok(out, "stage=eval")
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert [r["images"] for r in results] == [16, 16]
    assert all(math.isfinite(r["fid"]) and math.isfinite(r["clip_cosine"]) for r in results)

    latents = tmp_path / "latents"
    out = run_cli(
        "stage=encode",
        *[o for o in DATA_TINY if not o.startswith(("logger=", "trainer="))],
        "trainer=gpu",
        *TEXT_TINY,
        data,
        f"vae_ckpt={vae_ckpt}",
        f"output={latents}",
        f"hydra.run.dir={tmp_path / 'encode'}",
    )
    _ok(out, "stage=encode")
    assert "encoded 48 samples" in out.stdout, out.stdout[-2000:]


def test_tiny_stage2_fsdp_on_one_gpu_resumes_and_samples(tmp_path):
    vae = _random_vae_export(tmp_path / "vae.safetensors")
    run = tmp_path / "ldm"
    args = [
        *LDM_GPU,
        f"paths.data_dir={tmp_path / 'data'}",
        f"vae_ckpt={vae}",
        "trainer=fsdp",
        "trainer.accelerator=gpu",
        "trainer.devices=1",
    ]
    log = _ok(run_cli(*args, f"hydra.run.dir={run}"), "stage=ldm trainer=fsdp")
    _on_gpu_in_bf16(log)
    first = _losses_finite(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").is_file()  # a folder of shards
    log = _ok(run_cli(*args, "trainer.max_steps=5", f"hydra.run.dir={run}"), "resume")
    assert "Restoring states from the checkpoint path" in log, log[-3000:]
    assert len(_losses_finite(run)) > len(first)
    samples = tmp_path / "samples"
    out = run_cli(
        "stage=sample",
        f"ckpt={ckpt}",
        "prompts=['a red circle']",
        "steps=3",
        f"hydra.run.dir={samples}",
    )
    _ok(out, "stage=sample from a sharded checkpoint")
    assert (samples / "grid.png").is_file()


@pytest.mark.timeout(180)  # compiling is CPU work: 70 s for the tiny U-Net on 2 cores
@pytest.mark.parametrize(
    "variant",
    [
        ["model.compile=true"],
        ["model.compile=true", "model.compile_scope=model", "unet.channels_last=true"],
    ],
    ids=["layers", "model-channels-last"],
)
def test_tiny_stage2_compiled_on_gpu(tmp_path, variant):
    vae = _random_vae_export(tmp_path / "vae.safetensors")
    run = tmp_path / "ldm"
    args = [*LDM_GPU, f"paths.data_dir={tmp_path / 'data'}", f"vae_ckpt={vae}", *variant]
    log = _ok(run_cli(*args, "trainer.max_steps=2", f"hydra.run.dir={run}"), f"stage=ldm {variant}")
    _on_gpu_in_bf16(log)
    _losses_finite(run)
    assert (run / "export" / "ldm.safetensors").is_file()


SD_SIZE = [
    "data.image_size=256",
    "data.demo.image_size=256",
    "data.batch_size=2",
    "data.demo.samples_per_shard=8",
]


def test_sd_vae_stage1_at_256px_on_gpu(tmp_path):
    """Stage 1 at Stable Diffusion's size: vae=sd with LPIPS and the discriminator on."""
    run = tmp_path / "vae"
    args = [o for o in VAE_TINY if not o.startswith(("vae.", "loss.discriminator."))]
    log = _ok(
        run_cli(
            *args,
            *SD_SIZE,
            f"paths.data_dir={tmp_path / 'data'}",
            "vae=sd",
            "loss.disc_start=0",
            "trainer.max_steps=2",
            f"hydra.run.dir={run}",
        ),
        "stage=vae vae=sd",
    )
    _on_gpu_in_bf16(log)
    _losses_finite(run)


def test_sd15_stage2_at_256px_on_gpu_then_samples(tmp_path):
    """Stage 2 at SD 1.5's size on an SD-shaped (random) VAE, then sampling from it."""
    vae = AutoencoderKL(ch=128, ch_mult=[1, 2, 4, 4], resolution=256)
    vae_file = save_vae(vae, str(tmp_path / "vae.safetensors"))
    text = [
        "text_encoder.random_text_cfg.width=768",
        "text_encoder.random_text_cfg.output_dim=768",
        "text_encoder.random_text_cfg.heads=12",
        "text_encoder.random_text_cfg.layers=2",
    ]
    run = tmp_path / "ldm"
    args = [o for o in LDM_GPU if not o.startswith(("unet.", "text_encoder."))]
    log = _ok(
        run_cli(
            *args,
            *SD_SIZE,
            *text,
            f"paths.data_dir={tmp_path / 'data'}",
            "unet=sd15",
            "trainer.max_steps=2",
            f"vae_ckpt={vae_file}",
            f"hydra.run.dir={run}",
        ),
        "stage=ldm unet=sd15",
    )
    _on_gpu_in_bf16(log)
    _losses_finite(run)
    samples = tmp_path / "samples"
    out = run_cli(
        "stage=sample",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "prompts=['a red circle']",
        "steps=3",
        f"hydra.run.dir={samples}",
    )
    _ok(out, "stage=sample (sd15)")
    assert (samples / "grid.png").is_file()


def test_folder_fine_tunes_on_gpu_text_encoder_offloaded(tmp_path):
    """DreamBooth (a LoRA, with class images) with the text encoder kept on the CPU, and
    textual inversion, from a diffusers-written tiny pipeline on a folder of photos."""
    from PIL import Image
    from sd_fixtures import SMALL_UNET, SMALL_VAE, pipeline_folder

    from sd_lightning.commands.open import load_ldm

    base, *_ = pipeline_folder(tmp_path / "base", SMALL_UNET, SMALL_VAE, 16)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(40, 64), (64, 40), (48, 48)]):
        Image.new("RGB", size, (0, 128, 128)).save(photos / f"{i}.png")
    folder = ["data=folder", f"data.path={photos}", "data.image_size=32", "data.bucket_step=8"]
    common = [*GPU, "logger=csv", *folder, f"pretrained={base}", "model.val_sampler.steps=2"]
    common.append(f"paths.data_dir={tmp_path / 'data'}")
    runs = {
        "dreambooth": [
            "experiment=dreambooth",
            "+finetune.lora={rank: 4}",
            "finetune.class_prompt='a photo of a thing'",
            "finetune.num_class_images=2",
            "finetune.sampler.steps=2",
            "model.offload_text_encoder=true",
        ],
        "ti": ["experiment=textual_inversion", "finetune.token='<c1>'", "finetune.init_word=a"],
    }
    for name, overrides in runs.items():
        log = _ok(run_cli(*common, *overrides, f"hydra.run.dir={tmp_path / name}"), name)
        _on_gpu_in_bf16(log)
        _losses_finite(tmp_path / name)
    system = load_ldm(str(tmp_path / "dreambooth" / "checkpoints" / "last.ckpt")).to("cuda")
    assert system.conditioner.text.offload
    assert next(system.conditioner.text_encoder.parameters()).device.type == "cpu"
    assert system.encode_text(["a photo", "a photo"]).device.type == "cuda"
    assert len(system.conditioner._cache) == 1  # encoded once on the CPU, kept on the GPU
