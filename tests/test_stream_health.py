"""A data stream that yields nothing stops with the reasons; bad shards are logged once each."""

from __future__ import annotations

import logging
import re

import pytest
from bad_shards import BAD_KINDS, BAD_MESSAGES, bad_shards, good_shard, jpeg, write_tar
from torch.utils.data import DataLoader

from sd_lightning.data import expand_urls
from sd_lightning.data.health import DataStreamError
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.transforms import ImageTransform


def _pipeline(urls: list[str], **kwargs) -> ShardPipeline:
    defaults = dict(batch_size=4, resampled=True, batches_per_worker=50, shuffle_buffer=8)
    return ShardPipeline(urls, ImageTransform(32), **{**defaults, **kwargs})


def _shard_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "exact"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_stream_without_usable_samples_stops_with_the_reason(tmp_path, caplog, kind, resampled):
    urls = expand_urls(bad_shards(tmp_path, kind))
    pipe = _pipeline(urls, resampled=resampled, max_bad_shards=5, shard_retries=0)
    with caplog.at_level(logging.WARNING), pytest.raises(DataStreamError) as err:
        next(iter(pipe))
    message = str(err.value)
    assert message.startswith("0 usable samples from 5 shards in a row (rank 0 worker 0): ")
    assert BAD_MESSAGES[kind] in message and "data.max_bad_shards=5" in message
    assert str(urls[0]) in message or any(str(u) in message for u in urls)
    warned = _shard_warnings(caplog)
    assert len(warned) == len(set(warned)) <= len(urls)  # each bad shard once, never per attempt
    assert (len(warned) > 0) == (kind != "no_caption")  # a tar of captionless images is readable


def test_a_few_bad_shards_among_good_ones_are_skipped_and_logged_once(tmp_path, caplog):
    urls = expand_urls(bad_shards(tmp_path, "zip", shards=2)) + [
        str(good_shard(tmp_path / "g.tar"))
    ]
    # 2 bad shards of 3 per pass: at most 4 in a row across a pass boundary
    pipe = _pipeline(urls, resampled=False, batches_per_worker=30, max_bad_shards=5)
    with caplog.at_level(logging.WARNING):
        batches = list(pipe)
    assert len(batches) == 30
    assert sum(b["skipped"]["tar"] for b in batches) >= 2 * 10  # both drawn in every pass
    assert sorted(_shard_warnings(caplog)) == sorted(
        f"skipping shard {u} (not a tar file) (rank 0 worker 0)" for u in urls[:2]
    )
    summary = [r.getMessage() for r in caplog.records if "bad shard(s) skipped" in r.getMessage()]
    assert len(summary) == 1 and re.match(r"2 bad shard\(s\) skipped \d+ times in all", summary[0])
    assert re.search(re.escape(urls[0]) + r" \(\d+ times\)", summary[0])  # with its count


def test_a_pass_without_usable_samples_fails_when_it_ends(tmp_path):
    urls = expand_urls(bad_shards(tmp_path, "no_caption", shards=1))
    pipe = _pipeline(urls, resampled=False, batches_per_worker=None, shuffle_buffer=0)
    with pytest.raises(DataStreamError, match=r"from all 1 shard\(s\) of this pass.* no_caption"):
        list(pipe)


def test_a_failing_command_is_tried_again_then_reported_with_its_status(tmp_path, caplog):
    shard = good_shard(tmp_path / "g.tar")
    marker = tmp_path / "failed-once"
    flaky = f"pipe:if [ -e {marker} ]; then cat {shard}; else touch {marker}; exit 3; fi"
    pipe = _pipeline([flaky], resampled=False, batches_per_worker=None, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        assert sum(len(b["key"]) for b in pipe) == 8  # the second try read the shard
    assert not _shard_warnings(caplog)

    failing = f"pipe:cat {tmp_path}/missing.tar"
    pipe = _pipeline([failing], resampled=False, batches_per_worker=None, shard_retries=1)
    with pytest.raises(DataStreamError) as err:
        list(pipe)
    assert f"`cat {tmp_path}/missing.tar` exited with status 1 (2 tries)" in str(err.value)


def test_undecodable_samples_are_logged_a_few_times_then_counted(tmp_path, caplog):
    files = [(f"{k:03d}.jpg", b"\xff\xd8 not a jpeg") for k in range(10)]
    files += [(f"{k:03d}.txt", b"a caption") for k in range(10)]
    files += [("100.jpg", jpeg()), ("100.txt", b"a red square")]
    shard = write_tar(tmp_path / "corrupt.tar", sorted(files))
    pipe = _pipeline([str(shard)], resampled=False, batches_per_worker=None, batch_size=1)
    with caplog.at_level(logging.WARNING):
        batches = list(pipe)
    assert len(batches) == 1 and sum(b["skipped"]["decode"] for b in batches) == 10
    logged = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(logged) == 3 and "further ones are counted" in logged[-1].getMessage()


def test_a_worker_error_reaches_the_training_process_unwrapped(tmp_path):
    urls = expand_urls(bad_shards(tmp_path, "empty"))
    loader = DataLoader(_pipeline(urls, max_bad_shards=3), batch_size=None, num_workers=1)
    with pytest.raises(DataStreamError) as err:
        next(iter(loader))
    assert str(err.value).startswith("0 usable samples from 3 shards in a row (rank 0 worker 0)")
    assert "Traceback" not in str(err.value)
