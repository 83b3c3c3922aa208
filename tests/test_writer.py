"""``stage=shards``: captioned image folders and img2dataset-style shards into new shards that the
training pipeline reads back, with bad inputs skipped and counted."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from PIL import Image

from sd_lightning.data import make_demo_shards
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.shards import expand_urls
from sd_lightning.data.transforms import ImageTransform
from sd_lightning.data.writer import write_shards


def _read_back(urls: str) -> list[dict]:
    pipeline = ShardPipeline(
        expand_urls(urls), ImageTransform(16), batch_size=1, resampled=False, shuffle_buffer=0
    )
    return [b for b in pipeline]


def _image_folder(root, n: int) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        ext = ("jpg", "png", "webp")[i % 3]
        Image.new("RGB", (20 + i, 24), (10 * i, 0, 0)).save(folder / f"img{i:02d}.{ext}")
        (folder / f"img{i:02d}.txt").write_text(f"caption {i}\n")
    (root / "uncaptioned.jpg").write_bytes((root / "img00.jpg").read_bytes())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    (root / "broken.txt").write_text("a broken image")


@pytest.mark.slow
def test_stage_shards_from_an_image_folder(tmp_path):
    _image_folder(tmp_path / "raw", 23)
    out = run_cli(
        "stage=shards",
        f"input={tmp_path / 'raw'}",
        f"output={tmp_path / 'shards'}",
        "samples_per_shard=10",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wrote 23 samples in 3 shards" in out.stdout
    assert "decode=1, no_caption=1" in out.stdout
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 3}
    batches = _read_back(str(tmp_path / "shards" / "{000000..000002}.tar"))
    assert sorted(b["caption"][0] for b in batches) == sorted(f"caption {i}" for i in range(23))
    assert all(b["image"].shape == (1, 3, 16, 16) for b in batches)


def test_resharding_keeps_every_sample_and_its_metadata(tmp_path):
    urls = make_demo_shards(
        str(tmp_path / "img2dataset"),
        image_size=16,
        train_shards=3,
        val_shards=1,
        samples_per_shard=7,
    )
    result = write_shards(str(tmp_path / "img2dataset"), str(tmp_path / "out"), 5)
    assert result["samples"] == 28 and result["shards"] == 6 and not result["skipped"]
    original = sorted(b["caption"][0] for b in _read_back(urls["train"]) + _read_back(urls["val"]))
    assert sorted(b["caption"][0] for b in _read_back(result["urls"])) == original


def test_shards_refuses_to_overwrite_and_reports_empty_input(tmp_path):
    _image_folder(tmp_path / "raw", 3)
    write_shards(str(tmp_path / "raw"), str(tmp_path / "out"), 2)
    before = (tmp_path / "out" / "000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(str(tmp_path / "raw"), str(tmp_path / "out"), 2)
    assert (tmp_path / "out" / "000000.tar").read_bytes() == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="held no captioned images"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "out2"), 2)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_shards(str(tmp_path / "nope"), str(tmp_path / "out3"), 2)
