"""``stage=ldm`` then ``stage=sample`` as real subprocesses: images of the right size, seeds that
reproduce, and clear errors for missing or wrong checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LDM_TINY, run_cli
from PIL import Image

pytestmark = pytest.mark.slow

CLI_LDM = [o for o in LDM_TINY if not o.startswith("logger=")] + ["logger=csv"]


def _pngs(folder):
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


def test_ldm_then_sample_writes_images_that_reproduce(tmp_path, vae_ckpt, data_dir):
    run = tmp_path / "ldm"
    out = run_cli(
        *CLI_LDM,
        f"vae_ckpt={vae_ckpt}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_steps=2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run / "export" / "ldm.safetensors").is_file()
    assert list((run / "images").glob("val_samples_step*.png")), "no validation sample grid"

    prompts = "prompts=['a red circle at the top left','a blue square','a blue square']"
    common = ["stage=sample", f"ckpt={last}", prompts, "steps=3", "guidance=2.0", "seed=7"]
    first = run_cli(*common, f"hydra.run.dir={tmp_path / 's1'}")
    assert first.returncode == 0, first.stderr[-3000:]
    files = _pngs(tmp_path / "s1")
    assert [p.name for p in files] == [
        "000_a_red_circle_at_the_top_left.png",
        "001_a_blue_square.png",
        "002_a_blue_square.png",
    ]
    for path in [*files, tmp_path / "s1" / "grid.png"]:
        assert str(path) in first.stdout  # the paths are printed
    images = [np.asarray(Image.open(p)) for p in files]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert not np.array_equal(images[1], images[2])  # repeated prompt, seeds 8 and 9

    again = run_cli(*common, f"hydra.run.dir={tmp_path / 's2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    for a, b in zip(files, _pngs(tmp_path / "s2")):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))

    # bf16 weights (the default on GPUs): close to the float32 images
    low = run_cli(*common, "dtype=bfloat16", f"hydra.run.dir={tmp_path / 's3'}")
    assert low.returncode == 0, low.stderr[-3000:]
    for a, b in zip(files, _pngs(tmp_path / "s3")):
        diff = np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16))
        assert diff.mean() < 8, diff.mean()
    bad = run_cli(*common, "dtype=float8", f"hydra.run.dir={tmp_path / 's4'}")
    assert bad.returncode != 0 and "dtype='float8': choose auto, bfloat16 or float32" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stage=ldm"], "stage=ldm needs vae_ckpt=..."),
        (["stage=ldm", "vae_ckpt=/nope/last.ckpt"], "vae_ckpt='/nope/last.ckpt' does not exist"),
        (["stage=sample"], "stage=sample needs ckpt=..."),
    ],
)
def test_missing_checkpoints_are_clear_errors(tmp_path, args, message):
    overrides = [o for o in CLI_LDM if not o.startswith("stage=")] if "stage=ldm" in args else []
    out = run_cli(
        *overrides, *args, f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path}"
    )
    assert out.returncode != 0
    assert message in out.stderr


def test_a_stage1_checkpoint_is_refused_for_sampling(tmp_path, vae_ckpt):
    out = run_cli("stage=sample", f"ckpt={vae_ckpt}", f"hydra.run.dir={tmp_path / 's'}")
    assert out.returncode != 0
    assert "is a checkpoint of stage 'vae', not stage 'ldm'" in out.stderr
