"""stage=encode then stage=ldm data=latents: precomputed latents and text states in shards, read
back without pickle, equal to what the frozen encoders give online, and trained on."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import DATA_TINY, LDM_TINY, compose_config, run_cli
from hydra.utils import instantiate

from sd_lightning.commands.open import load_vae
from sd_lightning.commands.train import train
from sd_lightning.data.latents import LatentSampleDecoder
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.shards import expand_urls
from sd_lightning.data.transforms import to_model_range

pytestmark = pytest.mark.slow

TEXT_TINY = [o for o in LDM_TINY if o.startswith("text_encoder.")]


def test_encode_then_train_on_latents(tmp_path, vae_ckpt, data_dir):
    out_dir = tmp_path / "latents"
    out = run_cli(
        "stage=encode",
        *[o for o in DATA_TINY if not o.startswith("logger=")],
        *TEXT_TINY,
        f"vae_ckpt={vae_ckpt}",
        f"output={out_dir}",
        "samples_per_shard=20",
        "dtype=float32",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "encoded 48 samples into 3 shards" in out.stdout  # 3 demo train shards of 16
    sizes = json.loads((out_dir / "sizes.json").read_text())
    assert sum(sizes.values()) == 48
    urls = re.search(r"data\.urls='([^']+)'", out.stdout).group(1)

    # stored posteriors and text states equal the frozen encoders' online outputs
    cfg = compose_config([*LDM_TINY, f"vae_ckpt={vae_ckpt}"], tmp_path / "x", data_dir)
    data = instantiate(cfg.data, val_shards=0)
    data.prepare_data()
    data.setup("fit")
    originals = ShardPipeline(
        data.train_shard_urls, data.val_transform, 1, resampled=False, shuffle_buffer=0
    )
    images = {b["key"][0]: b for b in originals}
    vae, text = load_vae(str(vae_ckpt)), instantiate(cfg.text_encoder)
    stored = ShardPipeline(
        expand_urls(urls),
        None,
        4,
        resampled=False,
        shuffle_buffer=0,
        decoder=LatentSampleDecoder(text_states=True),
    )
    batch = next(iter(stored))
    with torch.no_grad():
        for i in range(4):
            source = _source_key(out_dir, batch["key"][i])
            original = images[source]
            posterior = vae.encode(to_model_range(original["image"]))
            torch.testing.assert_close(
                batch["latent_mean"][i], posterior.mean[0], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                batch["latent_logvar"][i], posterior.logvar[0], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                batch["text_states"][i], text(original["caption"])[0], atol=1e-4, rtol=1e-4
            )
            assert batch["caption"][i] == original["caption"][0]

    # stage 2 on the latents: neither encoder runs on training batches
    cfg = compose_config(
        [
            *LDM_TINY,
            f"vae_ckpt={vae_ckpt}",
            "data=latents",
            f"data.urls='{urls}'",
            "data.samples_per_epoch=32",
            "data.val_shards=1",
            "trainer.max_steps=3",
        ],
        tmp_path / "ldm",
        data_dir,
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    ckpt = torch.load(tmp_path / "ldm" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def _source_key(out_dir, key):
    """The original sample key stored in a latent sample's .json."""
    import tarfile

    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name == f"{key}.json":
                    return json.loads(tar.extractfile(member).read())["source_key"]
    raise KeyError(key)
