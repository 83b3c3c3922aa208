"""Signals honoured in every phase, not only between training steps: a real process sent SIGTERM
or Ctrl-C (SIGINT) during DreamBooth's class images or ``stage=encode`` stops within seconds,
keeps what it finished and exits with the signal's status; the same command then goes on."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, start_cli
from PIL import Image

from sd_lightning.core import stopping
from sd_lightning.data.folder_files import read_folder

pytestmark = pytest.mark.slow


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    start = time.monotonic()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}): {process.stdout.read()}")
        if time.monotonic() - start > timeout:
            process.kill()
            raise AssertionError("the phase never began")
        time.sleep(0.05)


def _stop(process: subprocess.Popen, signum: int) -> tuple[int, float, str]:
    """Send ``signum``; the exit status, the seconds until exit and the output."""
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the signal was not honoured within 60 s") from None
    return process.returncode, time.monotonic() - sent, out


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_dreamboths_class_images_stops_at_once_keeping_them(
    tmp_path, data_dir, small_base, signum, status
):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(photos / f"{i}.png")
    classes = tmp_path / "classes"
    command = [
        "trainer=debug",
        "logger=none",
        "data.batch_size=2",
        "experiment=dreambooth",
        f"pretrained={small_base}",
        "data=folder",
        f"data.path={photos}",
        "data.image_size=32",
        "data.bucket_step=16",
        "finetune.instance_prompt='a photo of sks star'",
        "finetune.class_prompt='a photo of a star'",
        "finetune.num_class_images=400",
        "finetune.sampler.steps=50",
        "finetune.sampler.batch_size=4",
        f"finetune.class_dir={classes}",
        "trainer.max_steps=1",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]

    def written() -> list[Path]:
        return sorted(classes.glob("*/*.png"))

    process = start_cli(*command)
    _wait_for(lambda: len(written()) >= 4, process)
    code, seconds, out = _stop(process, signum)
    kept = written()
    assert code == status, out[-3000:]
    assert seconds < 10, (seconds, out[-2000:])
    assert 4 <= len(kept) < 400 and "Traceback" not in out, out[-2000:]
    assert "stopped by" in out and "what was finished is kept" in out
    assert not list(classes.glob("*/*.part"))  # no half image
    if signum != signal.SIGTERM:
        return
    stamps = {p.name: p.stat().st_mtime_ns for p in kept}
    # the same command goes on from there: only the missing images are made
    process = start_cli(*command[:-1], f"hydra.run.dir={tmp_path / 'again'}")
    lines: list[str] = []
    _wait_for(lambda: _read_until(process, lines, "class images of"), process)
    _stop(process, signal.SIGTERM)
    assert f"dreambooth: {400 - len(kept)} class images of" in lines[-1]
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in kept)


def _read_until(process: subprocess.Popen, lines: list[str], text: str) -> bool:
    line = process.stdout.readline()
    lines.append(line)
    return text in line


def test_a_signal_during_stage_encode_keeps_the_complete_shards(tmp_path, data_dir, vae_ckpt):
    out_dir = tmp_path / "latents"
    process = start_cli(
        "stage=encode",
        *[o for o in TINY if not o.startswith(("logger=", "data.demo.", "vae.", "loss."))],
        "data.demo.image_size=32",
        "data.demo.train_shards=6",
        "data.demo.val_shards=1",
        "data.demo.samples_per_shard=400",
        f"vae_ckpt={vae_ckpt}",
        f"output={out_dir}",
        "samples_per_shard=16",
        "encode_text=false",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    _wait_for(lambda: len(list(out_dir.glob("*.tar"))) >= 2, process, timeout=400)
    code, seconds, out = _stop(process, signal.SIGTERM)
    assert code == 143 and seconds < 10, (code, seconds, out[-3000:])
    import json

    sizes = json.loads((out_dir / "sizes.json").read_text())
    shards = sorted(p.name for p in out_dir.glob("*.tar"))
    assert sorted(sizes) == shards and 2 <= len(shards) < 150  # every shard kept is counted
    assert "samples in" in out and "complete shards kept" in out


def test_reading_a_folder_stops_between_images(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    from sd_lightning.data.buckets import BucketTransform

    stopping.reset()
    stopping.record("SIGTERM")  # what the handler does when the signal arrives
    try:
        with pytest.raises(stopping.Stopped, match="SIGTERM during reading data.path"):
            read_folder(str(tmp_path), "a photo", BucketTransform(16, 8), "data.path")
    finally:
        stopping.reset()
