"""Files written before the package's layout changed still load: a tiny stage-2 checkpoint written
by main at 38397e7 (tests/data/, with the images it sampled then), whose stored config names the
classes where they were (``sd_lightning.models.OpenCLIPTextEncoder``,
``sd_lightning.checkpoints.load_vae``, ``sd_lightning.optim.adamw``), samples the same images and
exports."""

from __future__ import annotations

import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

OLD = ROOT / "tests" / "data" / "ldm-38397e7.ckpt"
SAMPLES = ROOT / "tests" / "data" / "ldm-38397e7-samples.safetensors"


def test_a_checkpoint_of_the_earlier_layout_samples_what_it_sampled_then(tmp_path):
    from sd_lightning.commands.open import load_ldm

    stored = torch.load(OLD, weights_only=True)["sd_lightning"]["config"]
    assert stored["text_encoder"]["_target_"] == "sd_lightning.models.OpenCLIPTextEncoder"
    system = load_ldm(str(OLD))
    with torch.no_grad():
        images = system.sample_images(
            ["a red circle at the top left", "a blue square"],
            seeds=[0, 1],
            sampler="ddim",
            steps=3,
            guidance=3.0,
        )
    torch.testing.assert_close(images, load_file(SAMPLES)["images"], atol=1e-5, rtol=0)
    out = run_cli(
        "stage=export",
        f"ckpt={OLD}",
        "format=diffusers",
        f"output={tmp_path / 'exported'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "exported" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
