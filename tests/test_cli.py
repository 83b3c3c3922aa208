"""``python -m sd_lightning stage=vae`` as a real subprocess: train, checkpoint, resume, errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_metrics, run_cli
from hydra.utils import instantiate
from safetensors import safe_open

from sd_lightning.data import make_demo_shards

pytestmark = pytest.mark.slow

CLI_TINY = [o for o in TINY if not o.startswith("logger=")] + ["logger=csv"]


def _shards_with_a_corrupt_sample(folder: Path) -> str:
    """Tiny demo shards, with one undecodable JPEG appended to the first training shard."""
    urls = make_demo_shards(
        str(folder), image_size=32, train_shards=3, val_shards=1, samples_per_shard=16
    )
    first = Path(urls["train"].replace("{000000..000002}", "000000"))
    with tarfile.open(first, "a") as tar:
        for name, data in (
            ("zzbroken.jpg", b"\xff\xd8\xff garbage"),
            ("zzbroken.txt", b"a broken image"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return urls


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    return read_metrics(run_dir)


def _last_value(rows, key):
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def test_train_checkpoint_and_resume(tmp_path):
    urls = _shards_with_a_corrupt_sample(tmp_path / "data")
    run = tmp_path / "run"
    common = [
        *CLI_TINY,
        f"data.urls={urls['train']}",
        f"data.val_urls={urls['val']}",
        "data.samples_per_epoch=48",  # the 48 good samples: one full pass reads the corrupt one
        "data.shuffle_buffer=0",
        f"hydra.run.dir={run}",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "loss.disc_start=2",
    ]
    first = run_cli("stage=vae", *common, "trainer.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert list((run / "images").glob("val_reconstructions_*.png"))

    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # loads without pickle
    assert ckpt["global_step"] == 6
    assert ckpt["sd_lightning"]["stage"] == "vae"
    assert ckpt["sd_lightning"]["config"]["vae"]["ch"] == 16
    assert not any("perceptual" in k for k in ckpt["state_dict"])

    exported = run / "export" / "vae.safetensors"
    with safe_open(exported, "pt") as f:
        vae = instantiate(json.loads(f.metadata()["config"]))
        vae.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    torch.testing.assert_close(
        vae.decoder.conv_out.weight, ckpt["state_dict"]["autoencoder.decoder.conv_out.weight"]
    )

    rows = _metrics(run)
    assert _last_value(rows, "val/psnr") is not None
    assert _last_value(rows, "data/skipped_decode") >= 1  # the corrupt JPEG: counted, not fatal

    second = run_cli("stage=vae", *common, "trainer.max_steps=9", f"ckpt_path={last}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 9  # continued from 6, not restarted
    skipped = ckpt["sd_lightning"]["skipped"]["decode"]
    assert skipped >= 1 and resumed["sd_lightning"]["skipped"]["decode"] >= skipped  # carried on
    assert not torch.equal(
        resumed["state_dict"]["autoencoder.decoder.conv_out.weight"],
        ckpt["state_dict"]["autoencoder.decoder.conv_out.weight"],
    )


def test_checkpoint_of_another_stage_is_refused(tmp_path):
    urls = make_demo_shards(
        str(tmp_path / "data"), image_size=32, train_shards=3, val_shards=1, samples_per_shard=16
    )
    run = tmp_path / "run"
    args = [*CLI_TINY, f"data.urls={urls['train']}", f"hydra.run.dir={run}", "trainer.max_steps=1"]
    assert run_cli("stage=vae", *args).returncode == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["sd_lightning"]["stage"] = "ldm"
    other = tmp_path / "ldm.ckpt"
    torch.save(ckpt, other)
    kept = (run / "checkpoints" / "last.ckpt").read_bytes()
    out = run_cli("stage=vae", *args, "trainer.max_steps=2", f"ckpt_path={other}")
    assert out.returncode != 0
    assert f"ckpt_path='{other}' is a checkpoint of stage 'ldm', not stage 'vae'" in out.stderr
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == kept  # nothing overwritten


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.urls=/nonexistent/{000..009}.tar",
            "data.urls matched no files: /nonexistent/{000..009}.tar",
        ),
        (
            "data.image_size=30",
            "data.image_size=30 is not divisible by the VAE's downsampling factor 4",
        ),
        ("stage=nope", "Could not find 'stage/nope'"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, override, message):
    out = run_cli(
        *CLI_TINY, override, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path}"
    )
    assert out.returncode != 0
    assert message in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_multirun_sweep_runs_each_value(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli(
        "-m",
        *CLI_TINY,
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.sweep.dir={sweep}",
        "trainer.max_steps=1",
        "model.optimizer.lr=1e-4,1e-3",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    lrs = {
        torch.load(sweep / j / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
            "sd_lightning"
        ]["config"]["model"]["optimizer"]["lr"]
        for j in ("0", "1")
    }
    assert lrs == {1e-4, 1e-3}
