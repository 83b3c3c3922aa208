"""Bad input, second round, from the command line as a user meets it, by the rule each breaks:
exports never destroy what a user has; no silent wrong result; every file is identified (by its
full signature) and checked before use, and the wrong kind of file for an option gets one line
naming what it is; every option is checked with the others before any model is built; and each
fix names an option that exists. (Signals in every phase: test_stopping.py; images, captions and
folders: test_image_inputs.py; LoRA tensors: test_lora_files.py.)"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest
import torch
from conftest import DATA_TINY, run_cli_all
from safetensors.torch import load_file, save_file

from sd_lightning.core.atomic import save_safetensors
from sd_lightning.weights.files import read_weight_file

pytestmark = pytest.mark.slow

FOLDER = ["trainer=debug", "logger=none", "data.image_size=32", "data.bucket_step=16"]


def _check(results, cases, seconds: float | None = None) -> None:
    for out, (args, message) in zip(results, cases):
        where = f"{[a for a in args if not a.startswith('hydra.')][:4]}: {out.stderr[-2500:]}"
        assert out.returncode == 1, where
        assert out.stderr.startswith("Error: ") and message in out.stderr, where
        assert "Traceback" not in out.stderr, where


@pytest.fixture(scope="module")
def base(small_base):
    return small_base


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 80 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of <c1>")
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir, base):
    from conftest import compose_config

    from sd_lightning.commands.train import train

    run = tmp_path_factory.mktemp("lora_run")
    overrides = [*DATA_TINY, "experiment=lora", f"pretrained={base}", "finetune.rank=4"]
    overrides += ["trainer.max_steps=1", "model.val_prompts=[]"]
    train(compose_config(overrides, run, data_dir))
    return run


# -- 1. nothing a user has is ever destroyed -------------------------------------------------------
def test_exports_replace_only_what_an_export_wrote_atomically_and_readable_by_others(
    tmp_path, base
):
    library = tmp_path / "models"  # a typo'd output=: a folder of the user's own files
    library.mkdir()
    (library / "v1-5.safetensors").write_bytes(b"precious")
    (library / "notes.txt").write_text("keep")
    export = ["stage=export", f"ckpt={base}", f"hydra.run.dir={tmp_path / 'run'}"]
    pipeline, single = tmp_path / "pipeline", tmp_path / "single.safetensors"
    old_mask = os.umask(0o022)
    try:
        results = run_cli_all(
            [
                [*export, "format=diffusers", f"output={library}", "overwrite=true"],
                [*export, "format=diffusers", f"output={pipeline}"],
                [*export, "format=single_file", f"output={single}"],
            ]
        )
    finally:
        os.umask(old_mask)
    _check(
        results[:1],
        [([], "is not a diffusers pipeline folder (it holds notes.txt, v1-5.safetensors)")],
    )
    assert (library / "v1-5.safetensors").read_bytes() == b"precious"
    for out in results[1:]:
        assert out.returncode == 0, out.stderr[-2000:]
    # exports are readable by a server running as another user (0644 under umask 022)
    files = [single, *pipeline.glob("*/*.safetensors")]
    assert files and all(oct(p.stat().st_mode & 0o777) == "0o644" for p in files)
    # overwrite=true replaces an export of ours (a pipeline folder), whole
    again = run_cli_all(
        [[*export, "format=diffusers", f"output={pipeline}", "overwrite=true", "dtype=float16"]]
    )[0]
    assert again.returncode == 0, again.stderr[-2000:]
    unet = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert next(iter(unet.values())).dtype == torch.float16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pipeline.")]  # no leftovers
    # a write that fails leaves the old file as it was, and nothing beside it
    before = single.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses a non-contiguous tensor
        save_safetensors({"x": torch.zeros(4, 4).t()}, str(single))
    assert single.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".single")] == []


# -- 3. no silent wrong result, 4. every file identified and checked -------------------------------
def _collide(path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose header length starts with 0x80 and a pickle protocol
    byte (2), as about 1 file in 256 does: padded metadata sets the length to 0x0280 = 640."""
    for pad in range(2000):
        save_file(tensors, path, metadata={"pad": "x" * pad})
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
        if length == 0x280:
            return
    raise AssertionError("no padding gave the colliding length")


def test_files_are_identified_by_their_whole_signature(tmp_path, lora_run):
    lora = load_file(lora_run / "export" / "lora.safetensors")
    colliding = tmp_path / "collide.safetensors"
    _collide(colliding, {k: lora[k] for k in sorted(lora)[:3]})
    assert colliding.read_bytes()[:2] == b"\x80\x02"  # what a pickle of protocol 2 begins with
    found = read_weight_file(str(colliding), "lora", "a LoRA")
    assert found.kind == "safetensors" and found.metadata["pad"]


def test_bad_values_and_wrong_files_are_one_line_before_any_work(
    tmp_path, data_dir, base, photos, lora_run
):
    lora_file = lora_run / "export" / "lora.safetensors"
    nan_lora = tmp_path / "nan.safetensors"
    state = load_file(lora_file)
    save_file({k: v * float("nan") if ".lora_up." in k else v for k, v in state.items()}, nan_lora)
    sd2_lora = tmp_path / "sd2.safetensors"  # the cross-attention of a 1024-d context
    save_file(
        {k: torch.zeros(4, 1024) if "attn2_to_k.lora_down" in k else v for k, v in state.items()},
        sd2_lora,
    )
    empty_embedding = tmp_path / "nothing.safetensors"
    save_file({"emb_params": torch.zeros(0, 64)}, empty_embedding)
    wide_embedding = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, wide_embedding)
    sample = ["stage=sample", f"ckpt={base}", f"hydra.run.dir={tmp_path / 's'}", "steps=1"]
    fit = [*FOLDER, "data=folder", f"data.path={photos}", f"pretrained={base}"]
    fit += [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'fit'}"]
    lora, ti = [*fit, "experiment=lora"], [*fit, "experiment=textual_inversion"]
    ldm = ["stage=ldm", *DATA_TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'l'}"]
    cases = [
        # no silent wrong result
        ([*sample, f"lora=[{nan_lora}]"], "holds NaN or infinite values"),
        ([*sample, f"lora=[{lora_file}]", "lora_scale=nan"], "lora_scale=nan"),
        ([*sample, f"lora=[{lora_file}]", "lora_scale=abc"], "lora_scale='abc': give a number"),
        ([*lora, "finetune.alpha=0"], "finetune.alpha=0: give a positive number"),
        ([*sample, f"embeddings=[{empty_embedding}]"], "with at least one vector"),
        ([*ti, "finetune.num_vectors=80"], "finetune.num_vectors=80: at most 75 fit"),
        # shapes checked, with the likely cause
        ([*sample, f"lora=[{sd2_lora}]"], "is 32x1024"),
        ([*sample, f"embeddings=[{wide_embedding}]"], "768 numbers (SD 1's), but this text"),
        # the wrong kind of file for an option
        (
            [*ldm, f"pretrained={base / 'vae'}"],
            "is a diffusers VAE folder (vae/): pretrained= takes",
        ),
        (
            [*ldm, f"vae_ckpt={base / 'unet'}"],
            "is a diffusers U-Net folder (unet/): vae_ckpt= takes",
        ),
        ([*ldm, f"vae_ckpt={lora_file}"], "is a LoRA file (give it to lora=[...]"),
        (
            [*ldm, f"vae_ckpt={base / 'text_encoder'}"],
            "is a text encoder folder (text_encoder/): vae_ckpt= takes",
        ),
        (
            [
                *ldm,
                f"vae_ckpt={base}",
                "text_encoder=clip_vit_l",
                f"text_encoder.pretrained={lora_file}",
            ],
            "is a LoRA file (give it to lora=[...]",
        ),
        # every option checked with the others, before any model is built
        ([*lora, "data.bucket_step=0"], "data.bucket_step=0: give a whole number of at least 8"),
        ([*fit, "experiment=dreambooth", "+finetune.lora='{rank: 4}'"], "as a mapping"),
        ([*lora, "finetune.dropout=1.5"], "finetune.dropout=1.5: give a number in [0, 1)"),
        ([*ldm, f"vae_ckpt={base}", "text_encoder.layer=99"], "skips 99 of the text encoder's"),
    ]
    start = time.monotonic()
    results = run_cli_all([a for a, _ in cases])
    _check(results, cases)
    # two at a time: each well under the time it takes to build a model and train a step
    assert (time.monotonic() - start) / len(cases) * 2 < 20


def test_reused_run_dirs_and_moved_bases_lead_to_an_option_that_exists(
    tmp_path, data_dir, base, photos, lora_run
):
    # a LoRA run's directory reused by another method, or by stage 1
    fit = [*FOLDER, "data=folder", f"data.path={photos}", f"pretrained={base}"]
    fit += [f"paths.data_dir={data_dir}", f"hydra.run.dir={lora_run}"]
    dreambooth = [*fit, "experiment=dreambooth", "finetune.class_prompt=null"]
    vae = ["stage=vae", *DATA_TINY, f"paths.data_dir={data_dir}", f"hydra.run.dir={lora_run}"]
    # the base moved: sampling and export take base=
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    copied_run = tmp_path / "lora"
    shutil.copytree(lora_run, copied_run)
    ckpt = copied_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    gone = str(tmp_path / "gone")
    config = json.loads(json.dumps(checkpoint["sd_lightning"]["config"]).replace(str(base), gone))
    checkpoint["sd_lightning"]["config"] = config
    torch.save(checkpoint, ckpt)
    sample = ["stage=sample", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 's'}", "steps=1"]
    cases = [
        (dreambooth, "holds a stage=ldm finetune=lora run's checkpoints"),
        (vae, "holds a stage=ldm finetune=lora run's checkpoints"),
        (
            sample,
            f"the base weights {gone}, which are not there any more: give their new place with base=",
        ),
    ]
    results = run_cli_all([a for a, _ in [*cases, ([*sample, f"base={moved}"], None)]])
    _check(results[:-1], cases)
    assert "vae_ckpt" not in results[2].stderr  # an option the user never set
    assert results[-1].returncode == 0, results[-1].stderr[-2000:]
