"""``stage=eval``: the numbers papers report, for a stage-2 model or a stage-1 VAE.

    # FID, KID and CLIP score per guidance value on COCO-2014 30k (docs/evaluation.md)
    python -m sd_lightning stage=eval eval=coco30k ckpt=<checkpoint, SD file or diffusers folder> \\
        eval.prompts=coco/captions_30k.txt eval.reference=coco/val2014_512 \\
        eval.guidance=[1.5,2,3,4,5,6,7,8] sampler=ddim steps=50 trainer.devices=8
    # rFID, PSNR, SSIM and LPIPS of a VAE's reconstructions of a shard set
    python -m sd_lightning stage=eval vae_ckpt=<stage=vae checkpoint or SD VAE> \\
        eval.reference='/data/imagenet_val/{0000..0049}.tar' image_size=256

Everything that can be wrong is checked before an image is generated: the options, the metric
weights (Inception, OpenCLIP, LPIPS), the prompts, the reference set (read once, its features
cached under ``eval.stats_dir``) and the model. Generation and features are split over the ranks
(``trainer.devices``, ``trainer.num_nodes``, SLURM as in training) and gathered once; image ``i``
starts from seed ``seed + i`` on any number of ranks. Writes ``eval.json``, ``eval.md``,
``eval.png`` (FID against CLIP score) and ``grids/`` in the run directory, and logs the numbers
to the run's loggers. A guidance value already evaluated (``parts/``) is not generated again
when a stopped run is started again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from sd_lightning.commands import eval_files as files
from sd_lightning.commands.eval_checks import check_eval
from sd_lightning.commands.sample import open_for_sampling
from sd_lightning.core import stopping
from sd_lightning.core.errors import InputError
from sd_lightning.data.images import save_png
from sd_lightning.evaluation import frechet, gather, measure
from sd_lightning.evaluation.clip_score import ClipScorer
from sd_lightning.evaluation.inception import InceptionFeatures, weights_path
from sd_lightning.evaluation.prompts import read_prompts
from sd_lightning.evaluation.reference import ReferenceSet, reference_features
from sd_lightning.systems.sampling import sample_grid

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_eval(cfg)
    fabric = _fabric(cfg)
    fabric.launch()
    with stopping.handling():  # a signal: the guidance values finished stay in parts/
        return _evaluate(cfg, fabric)


def _evaluate(cfg: DictConfig, fabric) -> dict[str, Any]:
    e, device = cfg.eval, fabric.device
    run = Run(fabric)
    stage2 = cfg.get("ckpt") is not None
    fid_size = int(e.fid_size) if e.get("fid_size") and stage2 else None  # stage 1: image_size
    inception = InceptionFeatures(
        weights_path(e.inception), int(e.feature_dim), e.resize, fid_size
    ).to(device)
    clip = prompts = opened = None
    if stage2:
        c = e.clip
        clip = ClipScorer(c.model, c.pretrained, c.cache_dir, c.get("quick_gelu")).to(device)
        prompts = read_prompts(e.prompts, int(e.num_images), e.prompt_seed)
        opened = open_for_sampling(cfg, device)  # (system, dtype)
    reference = ReferenceSet.of(e.reference)
    size = int(cfg.image_size) if cfg.image_size is not None else _model_size(opened)
    limit = int(e.reference_count) if e.reference_count else None
    crop = e.reference_crop == "centre"
    key = reference.key(
        size=size,
        limit=limit,
        crop=crop,
        fid_size=fid_size,
        resize=e.resize,
        dims=int(e.feature_dim),
        inception=inception.sha256,
    )
    cache = os.path.join(str(e.stats_dir), f"{key}.npz")
    real = reference_features(  # read at the FID size where one is set (GigaGAN: Lanczos)
        reference,
        inception,
        run.gather,
        run.rank,
        run.world,
        fid_size or size,
        limit,
        int(e.batch_size),
        cache,
        crop,
        lanczos=fid_size is not None,
        agree=run.agree,
    )
    _check_counts(cfg, len(real), int(e.num_images) if stage2 else len(real))
    started = time.time()
    record = files.record(cfg, inception, clip, reference, len(real), size)
    record["world_size"] = run.world
    if stage2:
        record["results"] = _generate_all(cfg, run, opened, inception, clip, prompts, real, size)
    else:
        record["results"] = [_reconstruct(cfg, run, inception, reference, real, size, crop)]
    record["seconds"] = round(time.time() - started, 1)
    if run.rank == 0:
        files.write(cfg, record)
    return record["results"][-1]


class Run:
    """The ranks of an evaluation, through Lightning Fabric."""

    def __init__(self, fabric) -> None:
        self.fabric, self.rank, self.world = fabric, fabric.global_rank, fabric.world_size

    def agree(self, answer: bool) -> bool:
        """Rank 0's answer, on every rank (a file's existence: one answer for all)."""
        return bool(self.fabric.broadcast(bool(answer), 0)) if self.world > 1 else bool(answer)

    def stop(self) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""
        asked = torch.tensor(float(stopping.requested() is not None), device=self.fabric.device)
        if self.world > 1:
            asked = self.fabric.all_reduce(asked, reduce_op="sum")
        return bool(asked > 0)

    def gather(self, rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.fabric.device
        found, keys = gather.gather_rows(
            self.fabric.all_gather, rows.to(device), keys.to(device), self.world
        )
        return found.cpu(), keys.cpu()


def _fabric(cfg: DictConfig):
    from lightning.fabric import Fabric

    trainer = cfg.trainer
    return Fabric(
        accelerator=trainer.get("accelerator", "auto"),
        devices=trainer.get("devices", "auto"),
        num_nodes=int(trainer.get("num_nodes", 1)),
        strategy="auto",
        precision="32-true",  # metric networks in float32; generation casts itself
    )


def _model_size(opened) -> int:
    if opened is None:
        raise InputError("image_size is not set: give the size the VAE is evaluated at, e.g. 256")
    return int(opened[0]._image_size())


def _check_counts(cfg: DictConfig, reference: int, generated: int) -> None:
    e = cfg.eval
    if reference < generated:
        raise InputError(
            f"eval.reference={e.reference!r} has {reference} usable images and "
            f"eval.num_images={generated}: give a reference set at least as large, or fewer images"
        )
    dims = int(e.feature_dim)
    if min(reference, generated) < dims and not e.allow_few:
        raise InputError(
            f"FID with {dims}-d features needs at least {dims} images in each set and "
            f"{min(reference, generated)} are given: use more (papers: 10k-50k), or "
            "eval.allow_few=true for a trend of small sets (not comparable with papers), or "
            "a smaller eval.feature_dim (64, 192, 768)"
        )


# -- stage 2: generate, per guidance value ---------------------------------------------------------
def _generate_all(cfg, run, opened, inception, clip, prompts, real, size) -> list[dict[str, Any]]:
    e = cfg.eval
    system, dtype = opened
    real_stats = frechet.Stats.of(real)
    results = []
    for g in [float(v) for v in e.guidance]:
        part = files.part_path(cfg, prompts, inception, clip, size, g)
        if run.agree(os.path.isfile(part)):
            with np.load(part) as stored:
                features, cosines = stored["features"], stored["cosines"]
            log.info("guidance %g: evaluated before (%s), not generated again", g, part)
        else:
            features, cosines, grid = _generate(
                cfg, run, system, dtype, inception, clip, prompts, g, size
            )
            if run.rank == 0:
                files.save_part(part, features, cosines)
                if grid is not None:
                    folder = os.path.join(cfg.paths.output_dir, "grids")
                    os.makedirs(folder, exist_ok=True)
                    save_png(grid, os.path.join(folder, f"guidance_{g:g}.png"))
        results.append(
            measure.scores(
                g,
                features,
                cosines,
                real,
                real_stats,
                int(e.kid_subsets),
                int(e.kid_subset_size),
                seed=int(cfg.seed),
            )
        )
        if run.rank == 0:
            log.info("guidance %g: %s", g, files.line(results[-1]))
    return results


def _generate(cfg, run, system, dtype, inception, clip, prompts, g, size):
    e = cfg.eval
    device = run.fabric.device
    low = device.type == "cuda" or dtype == torch.bfloat16

    mine = gather.padded_share(len(prompts), run.rank, run.world)
    bar = tqdm(
        total=len(mine),
        desc=f"guidance {g:g}",
        unit="image",
        disable=run.rank != 0,
        leave=False,
        dynamic_ncols=True,
    )

    def generate(captions: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            images = system.sample_images(
                captions,
                seeds=seeds,
                image_size=size,
                sampler=cfg.sampler,
                steps=int(cfg.steps),
                guidance=g,
                negative_prompt=cfg.negative_prompt,
                spacing=cfg.get("spacing"),
                batch_size=len(captions),
            )
        bar.update(len(captions))
        return images

    done = measure.measure(
        generate,
        inception,
        clip,
        prompts,
        mine,
        int(cfg.seed),
        int(e.batch_size),
        keep=int(e.grid_images),
        stop=run.stop,
    )
    bar.close()
    if done is None:  # every rank stops here together; the finished guidance values stay
        raise stopping.Stopped(stopping.requested() or "SIGTERM", "generating images for eval")
    rows, keys, shown = done
    if not len(rows):
        rows = torch.zeros((0, inception.dims + 1))
    found, _ = run.gather(rows, keys)
    grid = None
    if int(e.grid_images):
        flat = [im.float().flatten() for _, im in shown]
        grid_rows = torch.stack(flat) if flat else torch.zeros((0, 3 * size * size))
        grid_keys = torch.tensor([i for i, _ in shown], dtype=torch.long)
        grid_images, _ = run.gather(grid_rows, grid_keys)
        grid = sample_grid(grid_images.view(-1, 3, size, size) / 127.5 - 1)
    found = found.numpy()
    return found[:, :-1].astype(np.float32), found[:, -1].astype(np.float64), grid


# -- stage 1: reconstruct the reference set --------------------------------------------------------
def _reconstruct(cfg, run, inception, reference, real, size, crop) -> dict[str, Any]:
    from collections import Counter

    from sd_lightning.commands.open import load_vae
    from sd_lightning.evaluation.reconstruction import reconstruction_scores
    from sd_lightning.losses.perceptual import build_lpips

    e, device = cfg.eval, run.fabric.device
    vae = load_vae(cfg.vae_ckpt).to(device)
    lpips = build_lpips(e.lpips.trunk, e.lpips.weights_path).to(device)
    items = reference.images(size, run.rank, run.world, Counter(), crop)
    return reconstruction_scores(
        vae, lpips, inception, items, real, run.gather, int(e.batch_size), device
    )
