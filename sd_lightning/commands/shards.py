"""``stage=shards``: a folder of images with same-named ``.txt`` captions, or a folder of ``.tar``
shards (img2dataset's), packed into WebDataset shards with ``sizes.json``.

    python -m sd_lightning stage=shards input=/data/raw output=/data/shards samples_per_shard=10000
"""

from __future__ import annotations

from typing import Any

from sd_lightning.commands.preflight import require
from sd_lightning.data.writer import write_shards


def main(cfg) -> dict[str, Any]:
    """The ``stage=shards`` entry: prints the count and the ``data.urls`` to train on."""
    require(cfg)
    result = write_shards(
        str(cfg.input), str(cfg.output), int(cfg.samples_per_shard), str(cfg.prefix or "")
    )
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(result["skipped"].items())) or "none"
    print(
        f"wrote {result['samples']} samples in {result['shards']} shards to {cfg.output} "
        f"(skipped: {skipped}); train on data.urls='{result['urls']}'"
    )
    return result
