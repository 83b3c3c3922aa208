"""The optimizer options that make a large U-Net fit a card (SDXL's 2.6B): Adafactor, and any
optimizer stepped inside the backward pass (``model.optimizer.step_in_backward``: each parameter
steps as its gradient is ready, so the U-Net's gradients never exist at once), on the real
Trainer and config: the same weights as the usual step, exact resumption, a NaN loss skipped,
and what cannot go with it named before training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import LDM_TINY, compose_config

from sd_lightning.commands.train import train
from sd_lightning.core.errors import InputError
from sd_lightning.systems.optim import StepInBackward, make_optimizer

BASE = [
    *[o for o in LDM_TINY if o != "model.lr_scheduler=null"],
    "model.val_prompts=[]",
    "trainer.limit_val_batches=0",
    "model.ema_decay=null",
    "model.lr_scheduler.start_factor=0.1",  # an LR schedule the per-parameter optimizers follow
    "model.lr_scheduler.total_iters=4",
    "data.samples_per_epoch=8",  # 2 steps an epoch: a run stopped at step 2 resumes exactly
]


def _unet(run) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("unet.")}


def _run(tmp_path, data_dir, vae_ckpt, name: str, *more: str):
    run = tmp_path / name
    cfg = compose_config([*BASE, f"vae_ckpt={vae_ckpt}", *more], run, data_dir)
    train(cfg)
    return run


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_stepping_in_backward_trains_like_the_usual_step(tmp_path, data_dir, vae_ckpt, optimizer):
    common = [f"model.optimizer.name={optimizer}", "trainer.gradient_clip_val=null"]
    usual = _run(tmp_path, data_dir, vae_ckpt, "usual", *common, "trainer.max_steps=4")
    fused = _run(
        tmp_path, data_dir, vae_ckpt, "fused", *common, "trainer.max_steps=4",
        "model.optimizer.step_in_backward=true",
    )  # fmt: skip
    a, b = _unet(usual), _unet(fused)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6, msg=key)
    ckpt = torch.load(fused / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["optimizer_states"][0]
    assert len(state["per_parameter"]) == len(a)  # every parameter's state, for resuming
    # stopped after 2 steps and resumed to 4: the same weights
    resumed = _run(
        tmp_path, data_dir, vae_ckpt, "resumed", *common, "trainer.max_steps=2",
        "model.optimizer.step_in_backward=true",
    )  # fmt: skip
    halfway = _unet(resumed)
    assert max(float((halfway[k] - v).abs().max()) for k, v in b.items()) > 1e-4  # it trains
    cfg = compose_config(
        [*BASE, f"vae_ckpt={vae_ckpt}", *common, "trainer.max_steps=4",
         "model.optimizer.step_in_backward=true"], resumed, data_dir,
    )  # fmt: skip
    train(cfg)
    for key, value in _unet(resumed).items():
        assert torch.equal(value, b[key]), key


class _NaNAt(L.Callback):
    """Images of NaN in the batch of ``step``: the loss is NaN, nothing may step on it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["image"] = torch.full_like(batch["image"].float(), float("nan"))


def test_a_nan_loss_is_not_stepped_in_backward(tmp_path, data_dir, vae_ckpt):
    cfg = compose_config(
        [*BASE, f"vae_ckpt={vae_ckpt}", "trainer.max_steps=3", "trainer.gradient_clip_val=1.0",
         "model.optimizer.step_in_backward=true"], tmp_path / "run", data_dir,
    )  # fmt: skip
    from hydra.utils import instantiate

    system = instantiate(cfg.model)
    data = instantiate(cfg.data)
    from sd_lightning.callbacks.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(max_consecutive=5)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        limit_val_batches=0, callbacks=[_NaNAt(1), guard], gradient_clip_val=1.0,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(system, datamodule=data)
    assert guard.skipped == 1
    assert all(torch.isfinite(p).all() for p in system.unet.parameters())


def test_what_cannot_step_in_backward_is_named_before_training(tmp_path, data_dir, vae_ckpt):
    from sd_lightning.commands.preflight import check_training

    for option, said in (
        ("trainer.devices=2", "more than one device"),
        ("+trainer.accumulate_grad_batches=2", "accumulate_grad_batches"),
        ("trainer.precision=16-mixed", "16-mixed"),
    ):
        cfg = compose_config(
            [*BASE, f"vae_ckpt={vae_ckpt}", "model.optimizer.step_in_backward=true", option],
            tmp_path / "run",
            data_dir,
        )
        with pytest.raises(InputError, match=said):
            check_training(cfg)
    cfg = compose_config([*BASE, "model.optimizer.name=lion"], tmp_path / "run", data_dir)
    with pytest.raises(InputError, match="model.optimizer.name='lion'"):
        check_training(cfg)
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(InputError, match="Adafactor keeps factored moments"):
        make_optimizer(params, name="adafactor", eight_bit=True)
    assert isinstance(make_optimizer(params, step_in_backward=True), StepInBackward)
