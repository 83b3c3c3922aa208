"""COCO-2014 30k as MLPerf picks it, from COCO's own files: the captions and the real images an
evaluation compares with (``eval=coco30k``, ``eval=mlperf``; docs/evaluation.md).

    python -m sd_lightning.evaluation.coco --annotations coco/annotations/captions_val2014.json \\
        --images coco/val2014 --out data/coco/30k [--squash 512]

MLPerf's ``coco-split-resize.py`` shuffles all caption records with pandas'
``sample(frac=1, random_state=2023)`` (numpy's ``RandomState(2023).permutation``), keeps the first
caption of each image, takes the first 30,000 and sorts them by caption id. This writes those
captions, one a line in that order, to ``captions.txt``, their image ids to ``image_ids.txt``,
and the images to ``images/``: links to the originals (the evaluation centre-crops them), or with
``--squash 512`` MLPerf's reference images (the whole image resized to 512x512, PIL bicubic,
saved as JPEG as PIL saves by default).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def pick(annotations: list[dict], count: int = 30000, seed: int = 2023) -> list[dict]:
    """MLPerf's pick: one caption per image, ``count`` images, in caption-id order."""
    order = np.random.RandomState(seed).permutation(len(annotations))
    seen, picked = set(), []
    for i in order:
        record = annotations[i]
        if record["image_id"] in seen:
            continue
        seen.add(record["image_id"])
        picked.append(record)
        if len(picked) == count:
            break
    if len(picked) < count:
        raise SystemExit(f"only {len(picked)} images have captions; asked for {count}")
    return sorted(picked, key=lambda r: r["id"])


def image_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="captions_val2014.json")
    parser.add_argument("--images", required=True, help="the val2014 image folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=2023)
    parser.add_argument(
        "--squash", type=int, default=None, help="MLPerf's 512x512 reference images"
    )
    args = parser.parse_args(argv)
    with open(args.annotations, encoding="utf-8") as f:
        annotations = json.load(f)["annotations"]
    for record in annotations:  # as MLPerf: newlines removed, ends stripped
        record["caption"] = record["caption"].replace("\n", "").strip()
    picked = pick(annotations, args.count, args.seed)
    folder = os.path.join(args.out, "images")
    if os.path.isdir(folder) and os.listdir(folder):  # old images would join the reference set
        raise SystemExit(f"{folder} is not empty: give a new --out, or empty it first")
    os.makedirs(folder, exist_ok=True)
    missing = [
        r
        for r in picked
        if not os.path.isfile(os.path.join(args.images, image_name(r["image_id"])))
    ]
    if missing:
        raise SystemExit(
            f"{len(missing)} picked images are not in {args.images} (e.g. "
            f"{image_name(missing[0]['image_id'])}): give COCO-2014's val2014 folder"
        )
    for i, record in enumerate(picked):
        source = os.path.abspath(os.path.join(args.images, image_name(record["image_id"])))
        # numbered in caption order: a folder lists them as the captions file does
        target = os.path.join(folder, f"{i:05d}_{image_name(record['image_id'])}")
        if os.path.lexists(target):
            os.remove(target)
        if args.squash:
            from PIL import Image

            with Image.open(source) as image:
                image.resize((args.squash, args.squash), resample=Image.BICUBIC).save(target)
        else:
            os.symlink(source, target)
    with open(os.path.join(args.out, "captions.txt"), "w", encoding="utf-8") as f:
        f.writelines(r["caption"] + "\n" for r in picked)
    with open(os.path.join(args.out, "image_ids.txt"), "w") as f:
        f.writelines(f"{r['image_id']}\n" for r in picked)
    print(f"{len(picked)} captions: {os.path.join(args.out, 'captions.txt')}; images: {folder}")


if __name__ == "__main__":
    main()
