"""The lean tar reader against Python's own tarfile, in every header format real shards use."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest

from sd_lightning.data.tar import TarError, shard_samples, tar_members

LONG_DIR = "a" * 90 + "/" + "b" * 90  # needs a ustar prefix, a pax path or a GNU long name


def _tar(files: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("some_dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory entry is not a member
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FILES = [
    ("000.jpg", b"x" * 511),
    ("000.txt", "caption with ünïcode".encode()),
    (f"{LONG_DIR}/001.jpg", b"y" * 512),
    (f"{LONG_DIR}/001.json", b"{}"),
    ("ünïcode-name.txt", b""),
    ("002.JPG", b"z" * 1025),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_pythons_tarfile(fmt):
    files = FILES if fmt != tarfile.USTAR_FORMAT else [f for f in FILES if "ü" not in f[0]]
    data = _tar(files, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(tar_members(io.BytesIO(data))) == expected == files


def test_samples_group_by_key_like_webdataset(tmp_path):
    from webdataset.tariterators import tarfile_samples

    path = tmp_path / "shard.tar"
    path.write_bytes(_tar(FILES + [("__meta__", b"skipped"), ("noext", b"skipped")], 1))
    skipped = Counter()
    ours = list(shard_samples([str(path)], skipped))
    assert {s.pop("__shard__") for s in ours} == {1}  # the shard's number in this stream
    theirs = list(tarfile_samples([{"url": str(path)}]))
    assert ours == theirs and not skipped
    assert [s["__key__"] for s in ours] == ["000", f"{LONG_DIR}/001", "ünïcode-name", "002"]
    assert set(ours[3]) == {"__key__", "__url__", "jpg"}  # extensions lower-cased


def test_corrupt_and_truncated_archives_raise():
    data = _tar(FILES, tarfile.PAX_FORMAT)
    with pytest.raises(TarError, match="unexpected end"):
        list(tar_members(io.BytesIO(data[:2000])))
    with pytest.raises(TarError, match="corrupt or not a tar file"):
        list(tar_members(io.BytesIO(b"not a tar file" * 100)))
    flipped = bytearray(data)
    flipped[10] ^= 1  # one bit of the first file name
    with pytest.raises(TarError, match="checksum mismatch"):
        list(tar_members(io.BytesIO(bytes(flipped))))


def test_bad_shards_are_counted_and_complete_samples_kept(tmp_path):
    good = _tar(FILES, tarfile.GNU_FORMAT)
    (tmp_path / "good.tar").write_bytes(good)
    (tmp_path / "cut.tar").write_bytes(good[:5000])  # ends after 001.jpg, before 001.json
    dup = _tar([("k.jpg", b"1"), ("k.txt", b"a"), ("k.txt", b"b")], tarfile.GNU_FORMAT)
    (tmp_path / "dup.tar").write_bytes(dup)
    urls = [str(tmp_path / n) for n in ("cut.tar", "missing.tar", "dup.tar", "good.tar")]
    skipped = Counter()
    samples = list(shard_samples(urls, skipped))
    assert skipped == {"tar": 2, "duplicate": 1}
    keys = [(s["__url__"].rsplit("/", 1)[-1], s["__key__"]) for s in samples]
    assert keys[0] == ("cut.tar", "000")  # the sample cut in half is dropped
    assert keys[1] == ("dup.tar", "k") and samples[1]["txt"] == b"a"  # the first copy stays
    assert len(keys) == 2 + 4


def test_pipe_urls_and_failing_commands(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar(FILES, tarfile.PAX_FORMAT))
    skipped = Counter()
    samples = list(shard_samples([f"pipe:cat {path}", f"pipe:cat {tmp_path}/nope.tar"], skipped))
    assert len(samples) == 4 and samples[0]["txt"] == FILES[1][1]
    assert skipped == {"tar": 1}  # cat's exit status is reported, not swallowed


def test_a_pax_size_applies_to_the_member_not_to_a_long_name_header_between():
    """pax ``size`` (used for files of 8 GiB and more) belongs to the next *file*; a GNU long-name
    header in between keeps its own size."""
    long_name = "d" * 120 + "/k.bin"
    info = tarfile.TarInfo("short")
    info.size = 0  # the real size comes from the pax record
    data = b"abc"
    raw = (
        tarfile.TarInfo._create_pax_generic_header({"size": "3"}, tarfile.XHDTYPE, "utf-8")
        + tarfile.TarInfo._create_gnu_long_header(
            long_name, tarfile.GNUTYPE_LONGNAME, "utf-8", "strict"
        )
        + info.tobuf(tarfile.USTAR_FORMAT)
        + data.ljust(512, b"\0")
        + bytes(1024)
    )
    assert list(tar_members(io.BytesIO(raw))) == [(long_name, data)]
