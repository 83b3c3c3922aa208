"""What a person reads of an evaluation: ``eval.json`` (every number with what made it), a
markdown table, the FID-against-CLIP-score plot over the guidance values (the standard figure of
SD papers) and one sample grid per guidance value. Every file is written beside its place and
renamed: a stopped run leaves no half-written result."""

from __future__ import annotations

import json
import os
from typing import Any

from sd_lightning.core.atomic import beside, share

COLUMNS = {  # key in a result: column title, format
    "guidance": ("guidance", "{:g}"),
    "fid": ("FID", "{:.3f}"),
    "kid": ("KID x 1e3", None),
    "clip_score": ("CLIP score (100 x cos)", "{:.3f}"),
    "clip_cosine": ("CLIP cosine", "{:.4f}"),
    "rfid": ("rFID", "{:.3f}"),
    "psnr": ("PSNR (dB)", "{:.3f}"),
    "ssim": ("SSIM", "{:.4f}"),
    "lpips": ("LPIPS", "{:.4f}"),
    "images": ("images", "{:d}"),
}


def _replace(path: str, write) -> str:
    part = beside(path, "part")
    write(part)
    os.replace(part, path)
    share(path)
    return path


def write_json(path: str, record: dict[str, Any]) -> str:
    def write(part: str) -> None:
        with open(part, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    return _replace(path, write)


def _cell(key: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "kid":
        return f"{1e3 * value:.3f} ± {1e3 * row.get('kid_std', 0.0):.3f}"
    return COLUMNS[key][1].format(value)


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table, the columns they have."""
    keys = [k for k in COLUMNS if any(k in row for row in results)]
    lines = [
        "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "|" + "|".join("---:" for _ in keys) + "|",
    ]
    lines += ["| " + " | ".join(_cell(k, row) for k in keys) + " |" for row in results]
    return "\n".join(lines) + "\n"


def write_markdown(path: str, record: dict[str, Any]) -> str:
    protocol = record["protocol"]
    lines = [
        f"# Evaluation of {record['checkpoint']}",
        "",
        table(record["results"]),
        f"- images: {protocol['num_images']} per setting at {protocol['image_size']} px; "
        f"reference: {protocol['reference']} ({protocol['reference_count']} images, "
        f"{protocol['reference_transform']})",
        f"- FID: Inception-v3 {protocol['feature_dim']}-d features, {protocol['resize']} resize; "
        f"weights sha256 {record['weights']['inception']['sha256'][:16]}",
    ]
    if "sampler" in record:
        lines.append(
            f"- sampling: {record['sampler']}, {record['steps']} steps, seed {record['seed']} + i"
        )
    if "clip" in record["weights"]:
        clip = record["weights"]["clip"]
        lines.append(f"- CLIP score: OpenCLIP {clip['model']} ({clip['pretrained']})")
    text = "\n".join(lines) + "\n"

    def write(part: str) -> None:
        with open(part, "w") as f:
            f.write(text)

    return _replace(path, write)


def write_plot(path: str, results: list[dict[str, Any]], title: str) -> str:
    """FID (down is better) against CLIP score (right is better), one point per guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    x = [r["clip_score"] for r in results]
    y = [r["fid"] for r in results]
    ax.plot(x, y, "o-", color="tab:blue")
    for r in results:
        ax.annotate(
            f"cfg {r['guidance']:g}",
            (r["clip_score"], r["fid"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("CLIP score (100 x cosine)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()

    def write(part: str) -> None:
        fig.savefig(part, format="png")

    try:
        return _replace(path, write)
    finally:
        plt.close(fig)
