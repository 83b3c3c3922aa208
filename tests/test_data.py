"""Demo shards, URL expansion and the WebDataset pipeline on real tar files."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_lightning.data import WebDataModule, expand_urls, make_demo_shards
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.transforms import ImageTransform, to_model_range


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_shards_are_deterministic_and_complete(tmp_path):
    a = make_demo_shards(
        str(tmp_path / "a"), image_size=32, train_shards=2, val_shards=1, samples_per_shard=5
    )
    b = make_demo_shards(
        str(tmp_path / "b"), image_size=32, train_shards=2, val_shards=1, samples_per_shard=5
    )
    folder_a, folder_b = Path(a["train"]).parent, Path(b["train"]).parent
    assert _digest(folder_a) == _digest(folder_b)
    with tarfile.open(folder_a / "train-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 15 and {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    caption = tarfile.open(folder_a / "train-000000.tar").extractfile(names[1]).read().decode()
    assert caption.startswith("a ") and any(w in caption for w in ("circle", "square", "triangle"))
    assert len(expand_urls(a["train"])) == 2 and len(expand_urls(a["val"])) == 1


def test_urls_matching_nothing_or_partly_missing_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.urls matched no files: .*\{0\.\.9\}\.tar"):
        expand_urls(str(tmp_path / "{0..9}.tar"))
    (tmp_path / "1.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"9 of 10 shards are missing: .*0\.tar"):
        expand_urls(str(tmp_path / "{0..9}.tar"))
    assert expand_urls(str(tmp_path / "*.tar")) == [str(tmp_path / "1.tar")]
    assert expand_urls("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]


def _write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "bad.tar"
    _write_shard(
        shard,
        [
            {"a.jpg": _jpeg("red"), "a.txt": b"red"},
            {"b.jpg": b"\xff\xd8 this is not a jpeg", "b.txt": b"corrupt"},
            {"c.txt": b"caption without image"},
            {"d.jpg": _jpeg("blue")},  # no caption
            {"e.jpg": _jpeg("green"), "e.txt": b"green"},
        ],
    )
    pipe = ShardPipeline(
        [str(shard)],
        ImageTransform(16, crop="center"),
        batch_size=8,
        resampled=False,
        shuffle_buffer=0,
    )
    batches = list(pipe)
    assert len(batches) == 1 and batches[0]["caption"] == ["red", "green"]
    assert batches[0]["image"].shape == (2, 3, 16, 16)
    assert batches[0]["skipped"] == {
        "tar": 0,
        "no_image": 1,
        "decode": 1,
        "no_caption": 1,
        "too_small": 0,
        "duplicate": 0,
    }


def test_truncated_shard_is_skipped_not_fatal(tmp_path):
    good = tmp_path / "good.tar"
    _write_shard(good, [{f"{i}.jpg": _jpeg("red"), f"{i}.txt": b"red"} for i in range(3)])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:1500])
    pipe = ShardPipeline(
        [str(truncated), str(good)],
        ImageTransform(16),
        batch_size=1,
        resampled=False,
        shuffle_buffer=0,
    )
    batches = list(pipe)
    assert len(batches) >= 3
    assert sum(b["skipped"]["tar"] for b in batches) >= 1


def test_datamodule_on_demo_data_gives_equal_epochs(tmp_path):
    dm = WebDataModule(
        image_size=32,
        batch_size=4,
        num_workers=2,
        samples_per_epoch=40,
        demo=dict(
            root=str(tmp_path), image_size=32, train_shards=3, val_shards=1, samples_per_shard=8
        ),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_shard_urls) == 3 and len(dm.val_shard_urls) == 1
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.batches_per_epoch() == 10  # ceil(40 / 4 / 2 workers) * 2 workers
    assert all(b["image"].shape == (4, 3, 32, 32) for b in batches)
    assert all(b["image"].dtype == torch.uint8 for b in batches)  # 4x less to move
    on_device = dm.on_after_batch_transfer(batches[0], 0)["image"]
    assert on_device.dtype == torch.float32
    assert -1.0 <= float(on_device.min()) and float(on_device.max()) <= 1.0
    val = list(dm.val_dataloader())
    assert sum(len(b["caption"]) for b in val) == 8  # every held-out sample exactly once


def test_resampled_stream_is_reproducible_and_changes_per_epoch(tmp_path):
    urls = make_demo_shards(
        str(tmp_path), image_size=16, train_shards=4, val_shards=1, samples_per_shard=4
    )
    shards = expand_urls(urls["train"])

    def keys(epoch, seed=0):
        pipe = ShardPipeline(
            shards, ImageTransform(16), 2, batches_per_worker=6, shuffle_buffer=4, seed=seed
        )
        pipe.set_epoch(epoch)
        return [k for b in pipe for k in b["key"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    assert keys(0) != keys(0, seed=1)


def test_held_out_validation_shards_from_urls(tmp_path):
    urls = make_demo_shards(
        str(tmp_path), image_size=16, train_shards=4, val_shards=1, samples_per_shard=2
    )
    dm = WebDataModule(urls=urls["train"], image_size=16, val_shards=1, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_shard_urls) == 3 and dm.val_shard_urls[0].endswith("train-000003.tar")
    assert dm.samples_per_epoch == 6  # from sizes.json, held-out shard excluded
    assert isinstance(next(iter(dm.train_dataloader()))["image"], torch.Tensor)


def test_transform_resizes_crops_and_decodes_jpegs_at_reduced_scale():
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)  # smooth once upscaled
    big = Image.fromarray(base).resize((400, 300), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    transform = ImageTransform(32, crop="center")
    fast = to_model_range(transform(Image.open(io.BytesIO(buf.getvalue()))))  # draft decoding
    full = to_model_range(transform(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    assert fast.shape == full.shape == (3, 32, 32)
    assert -1.0 <= float(fast.min()) and float(fast.max()) <= 1.0
    assert float((fast - full).abs().mean()) < 0.03  # the same picture, up to resampling
    flipped = ImageTransform(32, crop="random", hflip=True)
    assert flipped(Image.open(io.BytesIO(buf.getvalue()))).shape == (3, 32, 32)
