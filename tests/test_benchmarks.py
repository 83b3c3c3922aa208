"""The GPU suite and its benchmarks at tiny sizes on the CPU, so that they cannot rot between the
rare sessions with a GPU: every part runs, writes its JSON and its section of the markdown, and
the comparisons with diffusers hold (same outputs, same sampler)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_suite")
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_suite.py",
            "--tiny",
            "--results",
            str(tmp / "results"),
            "--logs",
            str(tmp / "logs"),
            "--out",
            str(tmp / "gpu.md"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return tmp, out


def _json(tmp, part: str) -> dict:
    return json.loads((tmp / "results" / f"{part}.json").read_text())


def test_every_part_runs_and_the_markdown_has_its_figures(suite):
    tmp, out = suite
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp / "logs").glob("*.log")))
    assert out.returncode == 0, out.stdout[-3000:] + logs
    md = (tmp / "gpu.md").read_text()
    titles = (
        "U-Net training step",
        "Stage 2 as users run it",
        "Stage 1",
        "Sampling",
        "Fine-tuning",
        "SDXL at 1024 px",
        "stage=eval at 512 px",
        "Alignment's cost",
    )
    for title in titles:
        assert f"## {title}" in md
    assert md.count("exit 0") == 8 and "Not run yet." in md  # the pytest -m gpu part: GPU only
    parts = (
        "unet_step",
        "ldm_step",
        "vae_step",
        "sampling",
        "lora_step",
        "sdxl_step",
        "eval_speed",
    )
    for part in parts:
        result = _json(tmp, part)
        assert result["returncode"] == 0 and result["command"].startswith("python benchmarks/")
        assert result["command"] in md


def test_unet_step_compares_equal_networks_and_climbs_the_eager_ladder(suite):
    tmp, _ = suite
    result = _json(tmp, "unet_step")
    ours, theirs = (r for r in result["compare"] if r["impl"] in ("ours", "diffusers"))
    assert ours["output_rel_diff"] < 1e-5  # fp32 on the CPU: the same function as diffusers'
    assert ours["gflop_per_image"] == theirs["gflop_per_image"] > 0
    assert ours["ms_per_step"] > 0 and theirs["ms_per_step"] > 0
    rungs = {r["rung"]: r for r in result["ladder"]}
    eager = [r for r in rungs.values() if "compile" not in r["rung"]]
    assert eager and all(r.get("ms_per_step", 0) > 0 for r in eager), eager
    compiled = [r for r in rungs.values() if "compile" in r["rung"]]
    assert compiled and all("time budget" in r["skipped"] for r in compiled)


def test_lightning_and_sampling_parts_report_against_their_references(suite):
    tmp, _ = suite
    ldm = _json(tmp, "ldm_step")
    labels = [row[0] for row in ldm["rows"]]
    assert labels[0].startswith("bare U-Net step") and labels[-1].startswith("train()")
    assert all(row[1] > 0 for row in ldm["rows"])
    assert _json(tmp, "vae_step")["images_per_s"] > 0
    lora = {row[0]: row for row in _json(tmp, "lora_step")["rows"]}  # name, trained, ms, speed
    assert set(lora) == {"full fine-tuning", "LoRA rank 4", "LoRA rank 16"}
    assert lora["LoRA rank 4"][1] < lora["LoRA rank 16"][1] < lora["full fine-tuning"][1]
    assert all(row[2] > 0 for row in lora.values())
    sampling = _json(tmp, "sampling")
    # ours and diffusers' pipeline from the same noise: the same images (float32 on the CPU)
    assert all(diff < 1e-4 for *_, diff in sampling["rows"]), sampling["rows"]


def test_the_sdxl_part_compares_with_diffusers_and_measures_each_way_to_fit(suite):
    tmp, _ = suite
    result = _json(tmp, "sdxl_step")
    ours, theirs = (r for r in result["compare"] if r["impl"] in ("ours", "diffusers"))
    assert ours["output_rel_diff"] < 1e-5 and ours["gflop_per_image"] == theirs["gflop_per_image"]
    ways = {r["way"]: r for r in result["memory"]}
    assert set(ways) == {
        "AdamW",
        "AdamW, checkpointing, step in backward",
        "LoRA rank 32 (AdamW), checkpointing",
    }
    assert all(r["s_per_step"] > 0 for r in ways.values())
    lora = ways["LoRA rank 32 (AdamW), checkpointing"]
    assert lora["trained_params"] < ways["AdamW"]["trained_params"] / 3


def test_the_eval_part_measures_each_stage_against_torchmetrics(suite):
    tmp, _ = suite
    result = _json(tmp, "eval_speed")
    rows = {name.split(" (")[0].split(":")[0]: rate for name, rate in result["rows"]}
    assert set(rows) == {
        "generation",
        "Inception features",
        "torchmetrics FID update",
        "CLIP score",
    }
    assert len(result["rows"]) == 6 and all(rate > 0 for _, rate in result["rows"])
    used = [rate for name, rate in result["rows"] if name.startswith(("generation", "CLIP"))]
    used += [rate for name, rate in result["rows"] if name.startswith("Inception features (clean")]
    assert len(used) == 3 and 0 < result["images_per_s"] < min(used)  # the three stage=eval runs


def test_the_repa_part_times_every_way_against_the_plain_step(suite):
    tmp, _ = suite
    rows = {name: (ms, ratio) for name, ms, ratio, _ in _json(tmp, "repa_step")["rows"]}
    assert set(rows) == {
        "plain stage 2",
        "U-REPA, DINOv2 on the batch's images",
        "U-REPA, features precomputed (stage=encode)",
        "REPA-E (stage=e2e): VAE, discriminator and U-Net steps",
    }
    assert all(ms > 0 for ms, _ in rows.values()) and rows["plain stage 2"][1] == 1.0
