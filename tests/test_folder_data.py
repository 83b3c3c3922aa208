"""``data=folder`` and aspect-ratio buckets: a folder of odd-shaped photos (portrait, landscape,
square, tiny, huge, one unreadable) trains in buckets, every batch one shape, nothing cropped
beyond what sticks out of its bucket, as many batches on each of 2 ranks; shards bucket alike;
a real Trainer counts an epoch as the bucket plan has batches (its progress bar's total)."""

from __future__ import annotations

import io
import json
import logging
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sd_lightning.core.errors import InputError
from sd_lightning.data.buckets import batches_in_epoch, bucket_sizes
from sd_lightning.data.folder import FolderDataModule

SIZES = {  # name: (width, height)
    "portrait": (60, 100),
    "landscape": (120, 70),
    "square": (50, 50),
    "tiny": (9, 13),
    "huge": (1600, 1200),
    "panorama": (300, 60),
}


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1, 3)
    return Image.fromarray(np.broadcast_to(ramp, (h, w, 3)).astype(np.uint8))


@pytest.fixture
def photos(tmp_path):
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        _image(w, h, i).save(tmp_path / f"{name}.png")
    (tmp_path / "square.txt").write_text("a square photo\n")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp_path


def _batches(module, rank: int, world: int, monkeypatch) -> list[dict]:
    monkeypatch.setenv("RANK", str(rank))  # how webdataset (and our datasets) learn the rank
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = module.train_dataloader()
    loader.dataset.set_epoch(0)
    return list(loader.dataset)


def test_a_folder_of_odd_shapes_trains_in_buckets_on_two_ranks(photos, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    module = FolderDataModule(
        str(photos), caption="a photo", image_size=32, bucket_step=8, batch_size=2, repeats=3
    )
    module.setup()
    assert "skipping unreadable image" in caplog.text and "skipped 1 of 7" in caplog.text
    assert "1 image(s) smaller than their bucket were upscaled" in caplog.text
    sizes = bucket_sizes(32, 8, 2.0)
    ranks = [_batches(module, r, 2, monkeypatch) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0  # the same number of batches on every rank
    seen = []
    for batch in ranks[0] + ranks[1]:
        bh, bw = batch["image"].shape[-2:]
        assert (bw, bh) in sizes  # one bucket per batch
        for (h, w), (top, left), target in zip(
            batch["original_size"].tolist(), batch["crop_top_left"].tolist(), batch["target_size"]
        ):
            assert target.tolist() == [bh, bw]
            nearest = min(abs(math.log(sw / sh) - math.log(w / h)) for sw, sh in sizes)
            assert abs(math.log(bw / bh) - math.log(w / h)) == pytest.approx(nearest)
            scale = max(bw / w, bh / h)  # resized to cover the bucket, no more
            covered = (math.ceil(w * scale - 1e-6), math.ceil(h * scale - 1e-6))
            assert 0 <= left <= covered[0] - bw and 0 <= top <= covered[1] - bh
            assert min(covered[0] - bw, covered[1] - bh) == 0  # cropped along one side only
            seen.append((w, h))
        assert batch["caption"][0] in ("a photo", "a square photo")
    for w, h in SIZES.values():  # every readable image, every repeat (padding may add more)
        assert seen.count((w, h)) >= 3
    assert {(w, h) for w, h in seen} == set(SIZES.values())


def test_a_resumed_epoch_continues_where_it_stopped(photos, monkeypatch):
    module = FolderDataModule(str(photos), caption="x", image_size=32, bucket_step=8, repeats=2)
    module.setup()
    full = _batches(module, 0, 1, monkeypatch)
    loader = module.train_dataloader()
    loader.dataset.set_epoch(0, offset=3)
    rest = list(loader.dataset)
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest):
        assert torch.equal(a["image"], b["image"])


def test_the_prior_set_joins_the_epoch_with_its_loss_weight(photos, tmp_path_factory, monkeypatch):
    prior = tmp_path_factory.mktemp("prior")
    for i in range(2):
        _image(32, 32, 10 + i).save(prior / f"{i:05d}.png")
    module = FolderDataModule(str(photos), caption="sks", image_size=32, bucket_step=8)
    module.setup()
    module.set_prior(str(prior), "a photo of a thing", 0.5)
    samples = [
        s for b in _batches(module, 0, 1, monkeypatch) for s in zip(b["caption"], b["loss_weight"])
    ]
    prior_samples = [w for c, w in samples if c == "a photo of a thing"]
    assert len(prior_samples) == len(samples) - len(prior_samples) == len(SIZES)
    assert all(float(w) == 0.5 for w in prior_samples)


def test_folder_mistakes_name_the_fix(tmp_path, photos):
    with pytest.raises(InputError, match=r"have no caption .*data.caption="):
        FolderDataModule(str(photos), image_size=32, bucket_step=8).setup()
    with pytest.raises(InputError, match="is not a folder"):
        FolderDataModule(str(tmp_path / "nope"), caption="x").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no readable image"):
        FolderDataModule(str(tmp_path / "empty"), caption="x").setup()
    with pytest.raises(InputError, match="data.cache_latents=true .* data.crop=center"):
        FolderDataModule(str(photos), caption="x", crop="random", cache_latents=True)
    with pytest.raises(InputError, match="not a multiple of data.bucket_step=64"):
        FolderDataModule(str(photos), caption="x", image_size=100)


def test_shards_bucket_too_every_batch_one_shape(tmp_path):
    from sd_lightning.data.buckets import BucketTransform
    from sd_lightning.data.pipeline import ShardPipeline

    with wds.TarWriter(str(tmp_path / "0.tar")) as sink:
        for i in range(24):
            w, h = list(SIZES.values())[i % len(SIZES)]
            buf = io.BytesIO()
            _image(min(w, 200), min(h, 200), i).save(buf, format="PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": b"x"})
    transform = BucketTransform(32, 8, 2.0, crop="center")
    pipeline = ShardPipeline(
        [str(tmp_path / "0.tar")], transform, 3, resampled=False, shuffle_buffer=0
    )
    batches = list(pipeline)
    shapes = {tuple(b["image"].shape[-2:]) for b in batches}
    assert len(shapes) > 1 and sum(len(b["caption"]) for b in batches) == 24
    assert all(b["crop_top_left"].shape == (len(b["caption"]), 2) for b in batches)


def test_the_command_line_checks_the_folder_before_building_anything(tmp_path):
    from conftest import compose_config

    from sd_lightning.commands.preflight import check_training

    base = ["experiment=lora", "pretrained=/models/sd.safetensors", "data=folder"]
    with pytest.raises(InputError, match=r"needs data.path=\.\.\. \(data=folder: data.path="):
        check_training(compose_config(base, tmp_path / "a", tmp_path / "data"))
    missing = ["data.path=/photos/nope", *base]
    with pytest.raises(InputError, match="data.path='/photos/nope' is not a folder"):
        check_training(compose_config(missing, tmp_path / "b", tmp_path / "data"))


class _CountBatches(L.LightningModule):
    """The least a Trainer trains: counts the batches of each epoch and what Lightning expected."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.epochs: list[list[int]] = []  # [expected by Lightning, yielded]

    def on_train_epoch_start(self):
        self.epochs.append([self.trainer.num_training_batches, 0])

    def training_step(self, batch, index):
        self.epochs[-1][1] += 1
        return self.weight * batch["image"].mean()

    def validation_step(self, batch, index):  # none run (limit_val_batches=0)
        pass

    def on_fit_end(self):  # every rank's count, for the test to read back
        path = os.path.join(self.trainer.default_root_dir, f"epochs-{self.global_rank}.json")
        with open(path, "w") as f:
            json.dump(self.epochs, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_lightning_counts_an_epoch_as_the_bucket_plan_has_batches(photos, tmp_path, devices):
    from conftest import compose_config
    from hydra.utils import instantiate

    overrides = [
        "data=folder",
        f"data.path={photos}",
        "data.caption=x",
        "data.image_size=32",
        "data.bucket_step=8",
        "data.batch_size=3",
        "data.repeats=1",
        "data.cache_latents=false",
        "data.val_images=0",
    ]
    data = instantiate(compose_config(overrides, tmp_path / "run", tmp_path / "data").data)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(_CountBatches(), data)
    data.setup()
    buckets = [i.bucket for i in data.items]
    planned = batches_in_epoch(buckets, 3, devices) // devices  # this rank's share of the plan
    assert len(set(buckets)) == 3 and planned == (3 if devices == 1 else 2)  # 3 padded to 4
    for rank in range(devices):
        epochs = json.loads((tmp_path / f"epochs-{rank}.json").read_text())
        assert epochs == [[planned, planned]] * 2, rank  # Lightning knows what each epoch yields
