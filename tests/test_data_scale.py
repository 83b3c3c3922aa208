"""The loader at scale: equal batches per rank over uneven shards (real gloo processes, real
DataLoader workers), resampled streams that reproduce and differ per rank, source weights, exact
mode, and duplicate samples."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from test_data import _jpeg, _write_shard

from sd_lightning.data import FolderDataModule, WebDataModule
from sd_lightning.data.pipeline import ShardPipeline, resampled_shards
from sd_lightning.data.transforms import ImageTransform
from sd_lightning.data.writer import write_shards


def _uneven_shards(root, sizes) -> str:
    """One source per size: a folder with one shard of that many samples and its sizes.json
    (written by stage=shards' writer), joined with '::'."""
    from PIL import Image

    for s, n in enumerate(sizes):
        raw = root / f"raw{s}"
        raw.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (s * 40, i, 0)).save(raw / f"{i:03d}.png")
            (raw / f"{i:03d}.txt").write_text(f"shard {s} sample {i}")
        write_shards(str(raw), str(root / f"shards{s}"), n)
    return "::".join(str(root / f"shards{s}" / "000000.tar") for s in range(len(sizes)))


def _count_batches(rank: int, world: int, port: int, urls: str, photos: str, out) -> None:
    """Batches per epoch on this rank: shards in both modes, and a folder in buckets."""
    import multiprocessing

    # DataLoader workers forked, as under Lightning (a spawned worker re-imports everything:
    # seconds each); the rank reaches them through set_epoch either way
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = type("T", (), {"world_size": world, "current_epoch": 0})()
    try:
        counts = {}
        for mode in ("resampled", "exact"):
            dm = WebDataModule(
                urls=urls,
                val_shards=0,
                image_size=16,
                batch_size=3,
                num_workers=2,
                samples_per_epoch=60,
                mode=mode,
                shuffle_buffer=0,
            )
            dm.trainer = trainer
            dm.setup("fit")
            counts[mode] = [sum(1 for _ in dm.train_dataloader()) for _ in range(2)]
        folder = FolderDataModule(
            photos, caption="x", image_size=32, bucket_step=8, batch_size=2, num_workers=2
        )
        folder.trainer = trainer
        folder.setup("fit")
        shapes = set()
        for batch in folder.train_dataloader():
            shapes.add(tuple(batch["image"].shape[-2:]))
        counts["folder"] = [sum(1 for _ in folder.train_dataloader()), sorted(shapes)]
        counts["folder_expected"] = folder.batches_per_epoch()
        gathered = [None] * world
        dist.all_gather_object(gathered, counts)
        dist.barrier()  # every rank ends its epochs: no hang
        if rank == 0:
            out.put(gathered)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_two_workers_get_equal_batches_over_uneven_shards_and_buckets(tmp_path):
    from PIL import Image

    urls = _uneven_shards(tmp_path, [3, 17, 5, 9, 30, 2])
    photos = tmp_path / "photos"  # 7 images in 3 buckets of about 32x32 pixels
    photos.mkdir()
    for i, size in enumerate(
        [(32, 32), (40, 24), (24, 40), (60, 60), (80, 48), (18, 30), (32, 34)]
    ):
        Image.new("RGB", size, (i * 30, 0, 0)).save(photos / f"{i}.png")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_count_batches, args=(r, 2, port, urls, str(photos), out))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    gathered = out.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # 60 samples / (3 per batch x 2 ranks) = 10 per rank, rounded up to a multiple of 2 workers
    for mode in ("resampled", "exact"):
        assert [g[mode] for g in gathered] == [[10, 10], [10, 10]]
    # the folder in buckets: as many batches on both ranks as the module plans, several shapes
    (n0, shapes0), (n1, shapes1) = (g["folder"] for g in gathered)
    assert n0 == n1 == gathered[0]["folder_expected"] > 0
    assert len(set(shapes0) | set(shapes1)) == 3  # 24x40, 32x32 and 40x24


def test_resampled_streams_reproduce_and_differ_per_rank():
    urls = [f"/s/{i}.tar" for i in range(50)]

    def draw(rank, epoch=0, seed=0):
        stream = resampled_shards(urls, seed, epoch, rank, worker=0)
        return [next(stream)["url"] for _ in range(30)]

    assert draw(0) == draw(0)  # a restarted run draws the same stream
    assert draw(0) != draw(1)  # ranks draw different ones
    assert draw(0) != draw(0, epoch=1)


def test_source_weights_set_how_often_each_source_is_drawn():
    a, b = [f"/a/{i}.tar" for i in range(10)], [f"/b/{i}.tar" for i in range(2)]
    stream = resampled_shards(a + b, 0, 0, 0, 0, sources=[a, b], weights=[1.0, 3.0])
    drawn = Counter(next(stream)["url"][:3] for _ in range(4000))
    assert 0.70 < drawn["/b/"] / 4000 < 0.80  # 3 / (1 + 3), though /b/ has a sixth of the shards


def test_weights_and_exact_mode_errors_name_the_fix(tmp_path):
    urls = _uneven_shards(tmp_path, [2, 2, 2])
    with pytest.raises(ValueError, match="2 weights for 3 '::'-joined sources"):
        dm = WebDataModule(urls=urls, url_weights=[1, 2], samples_per_epoch=6, val_shards=0)
        dm.setup("fit")
    dm = WebDataModule(urls=urls, mode="exact", num_workers=4, samples_per_epoch=6, val_shards=0)
    dm.setup("fit")
    with pytest.raises(
        ValueError, match=r"4 worker\(s\) x 1 rank\(s\) = 4, but data.urls has only 3"
    ):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="data.mode must be"):
        WebDataModule(urls=urls, mode="sometimes")


def test_duplicate_samples_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "dup.tar"
    _write_shard(
        shard,
        [
            {"a.jpg": _jpeg("red"), "a.txt": b"first a"},
            {"b.jpg": _jpeg("blue"), "b.txt": b"b", "b.jpg ": b""},
            {"a.jpg": _jpeg("green"), "a.txt": b"a again"},  # the key a once more
        ],
    )
    # a file name repeated inside one sample
    import tarfile

    with tarfile.open(shard, "a") as tar:
        for name, data in (("c.jpg", _jpeg("red")), ("c.txt", b"c"), ("c.txt", b"c twice")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    pipe = ShardPipeline(
        [str(shard)], ImageTransform(16), batch_size=8, resampled=False, shuffle_buffer=0
    )
    batches = list(pipe)
    captions = [c for b in batches for c in b["caption"]]
    assert captions == ["first a", "b", "c"]
    assert sum(b["skipped"]["duplicate"] for b in batches) == 2


@pytest.mark.timeout(60)  # the old code skipped every sample of the second reading, forever
def test_a_shard_drawn_twice_in_a_row_is_not_duplicates(tmp_path):
    """Resampling draws shards with replacement: one shard read again right after itself gives
    its samples again, none of them skipped as duplicates."""
    shard = tmp_path / "one.tar"
    _write_shard(shard, [{f"{k}.jpg": _jpeg("red"), f"{k}.txt": k.encode()} for k in "abcd"])
    pipe = ShardPipeline(
        [str(shard)], ImageTransform(16), batch_size=2, batches_per_worker=6, shuffle_buffer=0
    )
    batches = list(pipe)
    assert [c for b in batches for c in b["caption"]] == list("abcd" * 3)
    assert sum(b["skipped"]["duplicate"] for b in batches) == 0
