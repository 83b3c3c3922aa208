"""``stage=encode``: precompute the frozen VAE's latent distribution and the text encoder's
states for a set of shards, into new shards that ``data=latents`` trains stage 2 on.

    python -m sd_lightning stage=encode vae_ckpt=.../last.ckpt data.urls='/data/{0..99}.tar' \\
        output=/data/latents trainer.devices=8

Runs Lightning's predict loop (a progress bar, any number of devices and nodes): each rank reads
its own share of the shards once (centre crops at ``data.image_size``) and writes its own
``r<rank>-<index>.tar`` shards; ``sizes.json`` is merged at the end and the ``data.urls`` to train
on is printed with the count.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from sd_lightning.commands.open import load_vae
from sd_lightning.commands.options import check_repa
from sd_lightning.commands.preflight import require
from sd_lightning.core import stopping
from sd_lightning.data.pipeline import ShardPipeline
from sd_lightning.data.writer import refuse_existing_shards
from sd_lightning.systems.encode import EncodeSystem, LatentShardWriter, merge_sizes, shard_pattern

log = logging.getLogger(__name__)


def encode(cfg: DictConfig) -> dict[str, Any]:
    require(cfg)
    output = str(cfg.output)
    refuse_existing_shards(output)
    vae = load_vae(str(cfg.vae_ckpt))
    text_encoder = instantiate(cfg.text_encoder) if cfg.encode_text else None
    repa = cfg.get("repa")
    vision = None
    if repa:
        check_repa(cfg)  # repa=urepa: the encoder's features stored, so training does not run it
        from sd_lightning.weights.vision import VisionEncoder

        plain = OmegaConf.to_container(repa, resolve=True)
        vision = VisionEncoder(
            str(repa.encoder), int(repa.resolution), plain.get("random_config"),
            plain.get("timm_model"), plain.get("timm_kwargs"),
        )  # fmt: skip
    system = EncodeSystem(vae, text_encoder, dtype=str(cfg.dtype), vision=vision)

    datamodule = instantiate(cfg.data, val_shards=0)
    datamodule.prepare_data()
    datamodule.setup("predict")
    factor = vae.downsample_factor
    if datamodule.image_size % factor:
        raise ValueError(
            f"data.image_size={datamodule.image_size} is not divisible by the VAE's downsampling "
            f"factor {factor}"
        )
    dataset = ShardPipeline(
        datamodule.train_shard_urls,
        datamodule.val_transform,  # centre crops: latents of the whole image, no augmentation
        datamodule.batch_size,
        resampled=False,
        shuffle_buffer=0,
        split_by_node=True,
        **datamodule.stream_checks,
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=datamodule.num_workers)
    writer = LatentShardWriter(output, int(cfg.samples_per_shard))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[writer], logger=False, enable_checkpointing=False
    )
    stopping.reset()
    try:
        with stopping.handling():
            trainer.predict(system, dataloaders=loader, return_predictions=False)
    except stopping.Stopped:
        if trainer.is_global_zero:  # the shards written so far, complete, and their sizes
            sizes = merge_sizes(output)
            log.warning(
                "stage=encode: %d samples in %d complete shards kept in %s (data.urls='%s')",
                sum(sizes.values()),
                len(sizes),
                output,
                shard_pattern(output, list(sizes)),
            )
        raise
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    sizes = merge_sizes(output)
    total = sum(sizes.values())
    urls = shard_pattern(output, list(sizes))
    print(
        f"encoded {total} samples into {len(sizes)} shards in {output} "
        f"(latents {vae.embed_dim}x{datamodule.image_size // factor}x"
        f"{datamodule.image_size // factor}, text states: {bool(cfg.encode_text)}, alignment "
        f"features: {vision is not None}); "
        f"train with data=latents data.urls='{urls}'"
    )
    return {"samples": total, "shards": len(sizes), "urls": urls}
