"""``finetune=textual_inversion`` and ``finetune=dreambooth`` on a folder of photos, from a
diffusers-written tiny pipeline: what trains, what checkpoints hold, exact resumption, the class
images DreamBooth generates once with the base model, and embeddings that diffusers' own
``load_textual_inversion`` reads into the same text-encoder outputs (the oracle, test-only)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from safetensors.torch import load_file

from sd_lightning.core.errors import InputError

diffusers = pytest.importorskip("diffusers")

FOLDER = [
    "trainer=debug",
    "logger=none",
    "data.image_size=32",
    "data.bucket_step=8",
    "data.batch_size=2",
    "data.repeats=2",
    "model.val_sampler.steps=2",
]
TI = [
    "experiment=textual_inversion",
    "finetune.token='<c1>'",
    "finetune.init_word=blue",
    "finetune.num_vectors=2",
    "model.optimizer.lr=5e-2",
]
DREAMBOOTH = [
    "experiment=dreambooth",
    "finetune.instance_prompt='a photo of sks star'",
    "finetune.class_prompt='a photo of a star'",
    "finetune.num_class_images=3",
    "finetune.sampler.steps=2",
]


@pytest.fixture(scope="module")
def base(small_base):
    return small_base


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Teal discs on grey, portrait, landscape and square."""
    folder = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate([(40, 64), (64, 40), (48, 48), (30, 90)]):
        pixels = np.full((h, w, 3), 200, np.uint8)
        yy, xx = np.mgrid[:h, :w]
        pixels[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(w, h) / 3) ** 2] = (0, 128, 128)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _train(run, data_dir, base, photos, *overrides):
    from sd_lightning.commands.train import train

    return train(
        compose_config(
            [*FOLDER, "data=folder", f"data.path={photos}", f"pretrained={base}", *overrides],
            run,
            data_dir,
        )
    )


def test_textual_inversion_trains_its_vectors_only_and_diffusers_reads_both_exports(
    tmp_path, data_dir, base, photos
):
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.conditioning.text_encoder import OpenCLIPTextEncoder
    from sd_lightning.finetune.embedding_files import load_embeddings

    run = tmp_path / "run"
    _train(run, data_dir, base, photos, *TI, "trainer.max_steps=3")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(state) == {"embeddings.weight", "latent_scale"}  # the vectors, not the networks
    encoder = OpenCLIPTextEncoder(pretrained=str(base), layer="auto")
    blue = encoder.tower.token_embedding.weight[encoder.tokenizer.encode("blue")[0]]
    assert (state["embeddings.weight"] - blue).abs().max() > 1e-3  # they moved from blue's
    assert sorted(os.listdir(run / "export")) == ["c1.safetensors", "learned_embeds.safetensors"]
    prompt = "a photo of <c1> on a table"
    load_embeddings(encoder, [str(run / "export" / "learned_embeds.safetensors")])
    ours = encoder([prompt])
    for name, token in (("learned_embeds.safetensors", None), ("c1.safetensors", "<c1>")):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
        pipe.load_textual_inversion(str(run / "export" / name), token=token)
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4, msg=name)
    # the checkpoint rebuilds the system (base from its folder) with the same word
    system = load_ldm(run / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(system.encode_text([prompt]), ours, atol=1e-6, rtol=0)
    # AUTOMATIC1111's file: ours keeps its token; renamed, the word is the file's name
    encoder = OpenCLIPTextEncoder(pretrained=str(base), layer="auto")
    assert load_embeddings(encoder, [str(run / "export" / "c1.safetensors")]) == ["<c1>"]
    torch.testing.assert_close(encoder([prompt]), ours, atol=1e-6, rtol=0)
    shutil.copy(run / "export" / "c1.safetensors", tmp_path / "zq9x.safetensors")
    encoder = OpenCLIPTextEncoder(pretrained=str(base), layer="auto")
    assert load_embeddings(encoder, [str(tmp_path / "zq9x.safetensors")]) == ["zq9x"]
    torch.testing.assert_close(encoder(["a photo of zq9x on a table"]), ours, atol=1e-6, rtol=0)


def test_a_textual_inversion_run_resumes_bit_exactly_mid_epoch(tmp_path, data_dir, base, photos):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, data_dir, base, photos, *TI, "trainer.max_steps=4")
    _train(resumed, data_dir, base, photos, *TI, "trainer.max_steps=1")  # epoch: 4 batches
    _train(resumed, data_dir, base, photos, *TI, "trainer.max_steps=4")
    a, b = (
        torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for r in (straight, resumed)
    )
    assert torch.equal(a["embeddings.weight"], b["embeddings.weight"])


def test_sampling_reads_embeddings_and_refuses_pickled_ones(tmp_path, data_dir, base):
    from sd_lightning.commands.sample import sample
    from sd_lightning.finetune.embedding_files import embedding_files, read_embedding

    vectors = torch.randn(3, 64)
    stem, (tensors, _) = next(iter(embedding_files("<wx9>", vectors).items()))
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / f"{stem}.safetensors")
    word, read = read_embedding(str(tmp_path / f"{stem}.safetensors"))
    assert word == "wx9" and torch.equal(read, vectors)
    cfg = compose_config(
        [
            "stage=sample",
            f"ckpt={base}",
            f"embeddings=[{tmp_path / 'wx9.safetensors'}]",
            "prompts=['a wx9 on a table']",
            "steps=2",
            "image_size=32",
        ],
        tmp_path / "sample",
        data_dir,
    )
    out = sample(cfg)
    assert os.path.isfile(out["grid"])
    torch.save({"emb_params": vectors}, tmp_path / "old.pt")
    with pytest.raises(InputError, match=r"not a \.safetensors file.*Convert it"):
        read_embedding(str(tmp_path / "old.pt"))


def test_dreambooth_class_images_come_from_the_base_model_once(tmp_path, data_dir, base, photos):
    from sd_lightning.commands.open import load_ldm
    from sd_lightning.data.images import to_uint8

    run = tmp_path / "run"
    # dropout, which only eval mode turns off, must not reach the class images
    _train(run, data_dir, base, photos, *DREAMBOOTH, "trainer.max_steps=2", "unet.dropout=0.5")
    root = data_dir / "dreambooth"
    (folder,) = [root / d for d in os.listdir(root) if d.startswith("a_photo_of_a_star-")]
    names = sorted(os.listdir(folder))
    assert names == ["00000.png", "00001.png", "00002.png"]
    stamps = [os.stat(folder / n).st_mtime_ns for n in names]
    system = load_ldm(str(base))  # what the base model samples for the class prompt
    with torch.no_grad():
        image = system.sample_images(
            ["a photo of a star"], seeds=[1], image_size=32, sampler="ddim", steps=2, guidance=7.5
        )[0]
    expected = to_uint8(image).permute(1, 2, 0).numpy().astype(int)
    got = np.asarray(Image.open(folder / "00001.png")).astype(int)
    assert np.abs(got - expected).max() <= 2
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("unet.") for k in state)  # the whole U-Net trained (no LoRA)
    _train(tmp_path / "again", data_dir, base, photos, *DREAMBOOTH, "trainer.max_steps=1")
    assert [os.stat(folder / n).st_mtime_ns for n in names] == stamps  # cached, not redone


def test_dreambooth_lora_keeps_only_adapters_of_both_networks(tmp_path, data_dir, base, photos):
    run = tmp_path / "run"
    lora = ["+finetune.lora={rank: 4, text_encoder: true}", "finetune.class_prompt=null"]
    _train(run, data_dir, base, photos, *DREAMBOOTH, *lora, "trainer.max_steps=2")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = set(state) - {"latent_scale"}
    assert trained and all(".lora_" in k for k in trained)
    assert any(k.startswith("text_tower.") for k in trained)  # the text encoder's adapters
    kohya = load_file(run / "export" / "lora.safetensors")
    assert any(k.startswith("lora_te_") for k in kohya) and any(
        k.startswith("lora_unet_") for k in kohya
    )


def test_textual_inversion_refuses_fsdp_and_known_words(tmp_path, data_dir, base, photos):
    from conftest import run_cli

    # in a process of its own: FSDP's process group must not outlive the test
    args = [*FOLDER, "data=folder", f"data.path={photos}", f"pretrained={base}", *TI]
    args.append(f"paths.data_dir={data_dir}")
    out = run_cli(*args, "trainer=fsdp", "trainer.devices=1", f"hydra.run.dir={tmp_path / 'a'}")
    assert out.returncode == 1 and "nothing to shard: use trainer=ddp" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(Exception, match="'blue' is already a word of the tokenizer"):
        _train(tmp_path / "b", data_dir, base, photos, *TI, "finetune.token=blue")
    # a caption that leaves the word's vectors past the 77-token context: they would never train
    long = "data.caption='" + "a very " * 37 + "<c1>'"
    with pytest.raises(InputError, match=r"num_vectors=2: in 1 of 1 captions .*\(only 1 fit"):
        _train(tmp_path / "c", data_dir, base, photos, *TI, long, "trainer.max_steps=1")


def test_memory_options_offloaded_text_encoder_and_8bit_adamw(tmp_path, data_dir, vae_ckpt):
    from conftest import LDM_TINY
    from hydra.utils import instantiate

    from sd_lightning.systems.optim import adamw

    cfg = compose_config(
        [*LDM_TINY, f"vae_ckpt={vae_ckpt}", "model.offload_text_encoder=true"], tmp_path, data_dir
    )
    system = instantiate(cfg.model).to(torch.float64)
    assert (
        next(system.conditioner.text_encoder.parameters()).dtype == torch.float32
    )  # left where it was
    captions = ["a red circle", "a blue square", "a red circle"]
    states = system.encode_text(captions)
    assert len(system.conditioner._cache) == 2  # each caption encoded once
    torch.testing.assert_close(states, system.conditioner.text_encoder(captions), atol=0, rtol=0)
    with pytest.raises(InputError, match="eight_bit=true needs the parameters on a CUDA GPU"):
        adamw([torch.nn.Parameter(torch.zeros(2))], eight_bit=True, lr=1e-4)
    with pytest.raises(Exception, match="offload_text_encoder=true .* textual inversion"):
        instantiate(
            compose_config(
                [
                    *LDM_TINY,
                    f"vae_ckpt={vae_ckpt}",
                    "model.offload_text_encoder=true",
                    "finetune=textual_inversion",
                ],
                tmp_path,
                data_dir,
            ).model
        )


def test_base_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import json

    from sd_lightning.finetune.base import cached_fingerprint, fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"a" * 100)
    first = cached_fingerprint(str(base))
    assert first == fingerprint(str(base))
    cache = json.loads((tmp_path / "cache" / "sd_lightning" / "sha256.json").read_text())
    assert cache[str(base)]["sha256"] == first  # remembered by path, size and time
    base.write_bytes(b"b" * 100)  # the same size, other bytes and another time
    os.utime(base, ns=(1, 1))
    assert cached_fingerprint(str(base)) == fingerprint(str(base)) != first
