"""trainer=fsdp (FSDP2 through Lightning's ModelParallelStrategy): the U-Net and its EMA copy
sharded per block, on real gloo processes: it trains like DDP, writes sharded checkpoints that
resume exactly and that sampling reads on one process; stage 1 says to use DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import TINY, read_metrics, run_cli, run_ldm_two_ranks
from safetensors.torch import load_file

from sd_lightning.commands.open import load_ldm
from sd_lightning.commands.resume import newest_checkpoint, resolve_ckpt_path
from sd_lightning.models.ema import EMA
from sd_lightning.models.parallel import fully_shard_unet, is_dtensor, mixed_precision_policy
from sd_lightning.models.unet import UNetModel

TINY_UNET = dict(
    model_channels=32,
    channel_mult=[1, 2],
    attention_levels=[1],
    num_heads=-1,
    num_head_channels=16,
    norm_groups=8,
    context_dim=32,
)


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A real gloo process group of one (this process) and its device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 32)


def test_sharded_unet_keeps_names_outputs_and_averages_ema_per_shard(one_rank_mesh):
    torch.manual_seed(0)
    plain = UNetModel(**TINY_UNET)
    sharded = UNetModel(**TINY_UNET)
    sharded.load_state_dict(plain.state_dict())
    ema_plain, ema_sharded = EMA(plain, 0.9), EMA(sharded, 0.9)
    fully_shard_unet(sharded, one_rank_mesh)
    fully_shard_unet(ema_sharded.net, one_rank_mesh)
    assert all(is_dtensor(p) for p in sharded.parameters())
    assert list(sharded.state_dict()) == list(plain.state_dict())  # single-file names kept

    x, t, c = _inputs()
    torch.testing.assert_close(sharded(x, t, c), plain(x, t, c), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # move the weights, then average them into both EMA copies
        for p, q in zip(plain.parameters(), sharded.parameters()):
            noise = torch.randn_like(p)
            p.add_(noise)
            q.to_local().add_(noise)
    ema_plain.update(plain)
    ema_sharded.update(sharded)
    for (name, a), b in zip(
        ema_plain.net.state_dict().items(), ema_sharded.net.state_dict().values()
    ):
        torch.testing.assert_close(b.full_tensor(), a, rtol=0, atol=1e-6, msg=name)
    assert int(ema_sharded.num_updates) == 1


def test_bf16_policy_computes_in_bf16_and_keeps_fp32_weights(one_rank_mesh):
    torch.manual_seed(0)
    plain = UNetModel(**TINY_UNET)
    sharded = UNetModel(**TINY_UNET)
    sharded.load_state_dict(plain.state_dict())
    fully_shard_unet(sharded, one_rank_mesh, mixed_precision_policy("bfloat16", "float32"))
    x, t, c = _inputs()
    out = sharded(x, t, c)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in sharded.parameters())  # what the optimizer sees
    torch.testing.assert_close(out.float(), plain(x, t, c), rtol=0.1, atol=0.05)
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in sharded.parameters())


def test_bad_dtypes_name_the_choices():
    with pytest.raises(ValueError, match=r"param_dtype='bf16': choose one of \['bfloat16'"):
        mixed_precision_policy("bf16")
    from sd_lightning.systems.strategy import FSDP2Strategy

    with pytest.raises(ValueError, match="reduce_dtype='fp32'"):
        FSDP2Strategy(reduce_dtype="fp32")


def test_newest_checkpoint_takes_complete_sharded_folders_and_skips_torn_ones(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()

    def sharded(name: str, step: int, index: bool = True):
        path = folder / name
        path.mkdir()
        torch.save({"global_step": step}, path / "meta.pt")
        (path / "__0_0.distcp").write_bytes(b"shard")
        if index:
            (path / ".metadata").write_bytes(b"index")
        return path

    torch.save({"global_step": 4}, folder / "step00000004.ckpt")
    sharded("step00000008.ckpt", 8)
    assert newest_checkpoint(str(folder)) == str(folder / "step00000008.ckpt")
    sharded("last.ckpt", 12, index=False)  # killed before the index was written
    sharded(".preempted-step00000016.ckpt.tmp", 16)  # an unfinished write, not a checkpoint
    assert newest_checkpoint(str(folder)) == str(folder / "step00000008.ckpt")

    # only trainer=fsdp resumes from a folder of shards; DDP gets an error that says so
    assert resolve_ckpt_path("auto", str(folder), sharded=True).endswith("step00000008.ckpt")
    with pytest.raises(ValueError, match="is a sharded checkpoint .* resume it with trainer=fsdp"):
        resolve_ckpt_path("auto", str(folder), sharded=False)
    with pytest.raises(ValueError, match="stage=sample ckpt="):
        resolve_ckpt_path(str(folder / "step00000008.ckpt"), str(folder))


# -- real processes ----------------------------------------------------------------------------


def _two_process_run(run, strategy: str, data_dir, vae_ckpt, *extra: str):
    """Stage 2 on 2 gloo processes with ``trainer=<strategy>`` (the real config group), logging
    every step; 32 samples per epoch = 4 steps per epoch per rank."""
    out = run_ldm_two_ranks(
        run,
        data_dir,
        vae_ckpt,
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "model.ema_decay=0.9",
        *extra,
        trainer=strategy,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _losses(run) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in read_metrics(run) if r["train/loss"]}


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_exactly_from_sharded_checkpoints(
    tmp_path, data_dir, vae_ckpt
):
    from concurrent.futures import ThreadPoolExecutor

    fsdp, ddp, resumed = tmp_path / "fsdp", tmp_path / "ddp", tmp_path / "resumed"
    runs = [(fsdp, "fsdp", 8), (ddp, "ddp", 8), (resumed, "fsdp", 4)]  # independent: at once
    with ThreadPoolExecutor(len(runs)) as pool:  # (their imports are much of their time)
        done = [
            pool.submit(_two_process_run, r, s, data_dir, vae_ckpt, f"trainer.max_steps={n}")
            for r, s, n in runs
        ]
        for job in done:
            job.result()

    # the same seed, data and maths: the loss of every step, and the final EMA weights, agree
    losses_fsdp, losses_ddp = _losses(fsdp), _losses(ddp)
    assert sorted(losses_fsdp) == list(range(8))
    for step, loss in losses_ddp.items():
        assert losses_fsdp[step] == pytest.approx(loss, rel=1e-4), step
    ema_fsdp, ema_ddp = (load_file(r / "export" / "ldm.safetensors") for r in (fsdp, ddp))
    assert ema_fsdp.keys() == ema_ddp.keys()
    for key, value in ema_ddp.items():
        torch.testing.assert_close(ema_fsdp[key], value, rtol=1e-3, atol=1e-4, msg=key)

    # a sharded checkpoint: one shard per rank, the index, Lightning's meta.pt; nothing left over
    last = fsdp / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(os.listdir(last))
    assert [p for p in os.listdir(fsdp / "checkpoints") if p.startswith(".")] == []
    # read whole on one process (stage=sample's loader): its EMA U-Net is the exported one
    system = load_ldm(str(last))
    for key, value in system.ema.net.state_dict().items():
        assert torch.equal(value, ema_fsdp[key]), key

    # stopped at step 4 (an epoch boundary) and resumed from the sharded checkpoint to step 8:
    # the same weights, EMA included, as the run that went through
    out = _two_process_run(resumed, "fsdp", data_dir, vae_ckpt, "trainer.max_steps=8")
    assert "resume: continuing from" in out.stdout + out.stderr
    assert len(_losses(resumed)) == 8  # both parts logged (csv/version_0 and version_1)
    ema_resumed = load_file(resumed / "export" / "ldm.safetensors")
    for key, value in ema_fsdp.items():
        assert torch.equal(ema_resumed[key], value), key


@pytest.mark.slow
def test_stage1_on_fsdp_says_to_use_ddp(tmp_path, data_dir):
    out = run_cli(
        *[o for o in TINY if not o.startswith("trainer=")],
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_steps=1",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode != 0
    assert "VAESystem has none: only stage=ldm is sharded; use trainer=ddp" in out.stderr
