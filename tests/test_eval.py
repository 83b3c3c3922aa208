"""``stage=eval``: FID, KID and CLIP score of a stage-2 model, rFID, PSNR, SSIM and LPIPS of a
VAE; the metrics against independent implementations (torchmetrics, pytorch-fid, clean-fid) on
the same images and weights; one and two ranks; the reference cache; bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_cli
from eval_fixtures import clip_folder, inception_file
from PIL import Image

from sd_lightning.core.errors import InputError
from sd_lightning.evaluation import frechet
from sd_lightning.evaluation.inception import FILES, InceptionFeatures


@pytest.fixture(scope="session")
def eval_weights(tmp_path_factory):
    """(Inception file, OpenCLIP folder): random weights in the real formats."""
    root = tmp_path_factory.mktemp("eval_weights")
    return inception_file(root), clip_folder(root / "clip")


def shapes(count: int, size: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    from sd_lightning.data.demo import draw_sample

    rng = np.random.default_rng(seed)
    drawn = [draw_sample(rng, size) for _ in range(count)]
    return [d[0] for d in drawn], [d[1] for d in drawn]


@pytest.fixture(scope="session")
def real_set(tmp_path_factory):
    """A folder of 91 real 40x48 images (not square: the centre crop matters; an odd count) and
    a prompts file."""
    root = tmp_path_factory.mktemp("real_set")
    images, captions = shapes(91, 48, seed=5)
    (root / "images").mkdir()
    for i, image in enumerate(images):
        image.crop((4, 0, 44, 48)).save(root / "images" / f"{i:03d}.png")
    (root / "captions.txt").write_text("\ufeff" + "\n".join(captions) + "\n\n")  # a BOM, blanks
    return root


def uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)


# -- the metrics against other implementations --------------------------------------------------
def test_fid_and_kid_equal_torchmetrics_on_the_same_images_and_weights(eval_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    weights, _ = eval_weights
    real = uint8(shapes(70, 48, seed=1)[0])  # KID over whole sets of one size: no random subsets
    fake = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (70, 3, 48, 48), np.uint8))
    ours = InceptionFeatures(str(weights), dims=64, resize="legacy_tensorflow")
    a, b = ours(real).numpy(), ours(fake).numpy()
    fid = frechet.frechet_distance(frechet.Stats.of(b), frechet.Stats.of(a))
    reference = FrechetInceptionDistance(
        feature=64, feature_extractor_weights_path=str(weights), antialias=False
    )
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert fid == pytest.approx(float(reference.compute()), rel=1e-3)
    assert fid > 1e-3  # different sets: a distance that can fail
    kid, _ = frechet.kernel_distance(b, a, subsets=1, subset_size=70)
    kid_reference = KernelInceptionDistance(feature=ours, subsets=1, subset_size=70)
    kid_reference.update(real, real=True)
    kid_reference.update(fake, real=False)
    assert kid == pytest.approx(float(kid_reference.compute()[0]), rel=1e-3)


def test_legacy_pytorch_features_equal_pytorch_fid_from_torch_hubs_cache(
    eval_weights, tmp_path, monkeypatch
):
    """pytorch-fid's own network (MLPerf's) reads pytorch-fid's file name from torch hub's
    cache; ours finds the same file there with eval.inception=null and gives its features."""
    from pytorch_fid.inception import InceptionV3

    from sd_lightning.evaluation.inception import weights_path

    weights, _ = eval_weights
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(weights, checkpoints / FILES[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    found = weights_path(None)
    assert found == str(checkpoints / FILES[1])
    images = uint8(shapes(6, 48, seed=3)[0])
    ours = InceptionFeatures(found, dims=2048, resize="legacy_pytorch")(images)
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    with torch.no_grad():
        theirs = net(images.float() / 255)[0].flatten(1)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max())


def test_clean_resize_equals_clean_fids():
    from cleanfid.resize import make_resizer

    from sd_lightning.evaluation.inception import clean_resize

    images = uint8(shapes(3, 48, seed=4)[0])
    theirs = make_resizer("PIL", False, "bicubic", (299, 299))
    expected = np.stack([theirs(im.permute(1, 2, 0).numpy()) for im in images])
    assert np.array_equal(clean_resize(images).permute(0, 2, 3, 1).numpy(), expected)


def test_clip_score_equals_open_clips_own_pipeline(eval_weights):
    import open_clip

    from sd_lightning.evaluation.clip_score import ClipScorer

    _, folder = eval_weights
    images, captions = shapes(5, 48, seed=6)
    scorer = ClipScorer(f"local-dir:{folder}")
    ours = scorer(uint8(images), captions)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        a = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        b = model.encode_text(tokenizer(captions), normalize=True)
    assert torch.allclose(ours, (a * b).sum(-1), atol=1e-5)
    assert scorer.sha256 != "random" and len(scorer.sha256) == 64


@pytest.mark.parametrize(
    "model,tag,reference",
    [  # openai/clip-vit-large-patch14's config.json; laion's CLIP-ViT-H-14-laion2B-s32B-b79K
        ("ViT-L-14", "openai", (24, 1024, 16, 14, 12, 768, 12, 768, "quick_gelu")),
        ("ViT-H-14", "laion2b_s32b_b79k", (32, 1280, 16, 14, 24, 1024, 16, 1024, "gelu")),
    ],
)
def test_the_clip_presets_build_the_published_architectures(cfg_factory, model, tag, reference):
    """eval (ViT-L-14 openai) and eval=mlperf (ViT-H-14) without their weights: the network the
    files would land in, on the meta device, against the published configs."""
    from sd_lightning.evaluation.clip_score import architecture

    preset = "mlperf" if model == "ViT-H-14" else "default"
    cfg = cfg_factory("stage=eval", f"eval={preset}", tiny=False)
    assert (cfg.eval.clip.model, cfg.eval.clip.pretrained) == (model, tag)
    net = architecture(model, tag)
    v, t = net.visual.transformer, net.transformer
    act = "quick_gelu" if type(v.resblocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    found = (
        len(v.resblocks),
        v.width,
        v.resblocks[0].attn.num_heads,
        net.visual.patch_size[0],
        len(t.resblocks),
        t.width,
        t.resblocks[0].attn.num_heads,
        net.text_projection.shape[1],
        act,
    )
    assert found == reference


# -- stage=eval from the command line ---------------------------------------------------------------
def eval_args(weights, folder, run: Path, *extra: str) -> list[str]:
    return [
        "stage=eval",
        f"hydra.run.dir={run}",
        f"eval.inception={weights}",
        f"eval.clip.model=local-dir:{folder}",
        "eval.feature_dim=64",
        "eval.batch_size=24",
        "eval.kid_subsets=10",
        "steps=3",
        "trainer.accelerator=cpu",
        *extra,
    ]


@pytest.mark.slow
def test_eval_of_a_checkpoint_on_one_and_two_ranks(demo_model, eval_weights, real_set, tmp_path):
    """FID, KID and CLIP score per guidance value, every file a person reads, the loggers' rows;
    run again, the reference features come from the cache and the finished guidance values are
    not generated again; on two processes (67 images: the ranks' shares differ), the same."""
    weights, folder = eval_weights
    common = [
        f"ckpt={demo_model.ckpt}",
        f"eval.prompts={real_set / 'captions.txt'}",
        f"eval.reference={real_set / 'images'}",
        "eval.num_images=67",
        "eval.guidance=[1,4]",
        "logger=csv",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    stats = f"eval.stats_dir={tmp_path / 'stats'}"
    done = run_cli(*eval_args(weights, folder, one, *common, stats))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((one / "eval.json").read_text())
    assert [r["guidance"] for r in record["results"]] == [1.0, 4.0]
    for result in record["results"]:
        assert result["images"] == 67
        assert result["fid"] > 0 and np.isfinite(result["kid"])
        assert result["clip_score"] == pytest.approx(max(100 * result["clip_cosine"], 0))
    assert record["results"][0]["fid"] != record["results"][1]["fid"]  # guidance changes images
    assert record["checkpoint_sha256"] == _sha256(demo_model.ckpt)
    protocol = record["protocol"]
    assert (protocol["reference_count"], protocol["image_size"], protocol["resize"]) == (
        91,
        32,
        "clean",
    )
    assert record["weights"]["inception"]["sha256"] == _sha256(weights)
    assert (record["sampler"], record["steps"], record["seed"], record["world_size"]) == (
        "ddim",
        3,
        2023,
        1,
    )
    assert "| guidance | FID |" in (one / "eval.md").read_text()
    assert "| guidance | FID |" in done.stdout
    assert Image.open(one / "eval.png").format == "PNG"
    assert sorted(p.name for p in (one / "grids").iterdir()) == ["guidance_1.png", "guidance_4.png"]
    rows = (one / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "eval/fid" in rows[0] and len(rows) == 3
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1

    again = run_cli(*eval_args(weights, folder, one, *common, stats))
    assert again.returncode == 0, again.stderr[-3000:]
    log = (one / "__main__.log").read_text()
    assert "from the cache" in log and log.count("not generated again") == 2
    assert json.loads((one / "eval.json").read_text())["results"] == record["results"]

    # two ranks, their own reference cache: the reference features are split over the ranks too
    stats_two = f"eval.stats_dir={tmp_path / 'stats_two'}"
    split = run_cli(
        *eval_args(weights, folder, two, *common, stats_two, "trainer.devices=2"),
        "eval.grid_images=0",
        timeout=600,
    )
    assert split.returncode == 0, split.stderr[-3000:]
    record_two = json.loads((two / "eval.json").read_text())
    assert record_two["world_size"] == 2 and not (two / "grids").exists()  # grid_images=0
    for a, b in zip(record["results"], record_two["results"]):
        assert b["images"] == a["images"]
        for key in ("fid", "kid", "clip_score", "clip_cosine"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_eval_of_a_vae_reports_rfid_psnr_ssim_and_lpips(vae_ckpt, eval_weights, real_set, tmp_path):
    from torchmetrics.functional.image import peak_signal_noise_ratio

    from sd_lightning.commands.open import load_vae
    from sd_lightning.evaluation.reference import square

    weights, folder = eval_weights
    run = tmp_path / "vae_eval"
    done = run_cli(
        *eval_args(
            weights,
            folder,
            run,
            f"vae_ckpt={vae_ckpt}",
            f"eval.reference={real_set / 'images'}",
            "image_size=32",
            "eval.lpips.trunk=random",
            f"eval.stats_dir={tmp_path / 'stats'}",
        )
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads((run / "eval.json").read_text())["results"]
    assert result["images"] == 91 and result["rfid"] > 0
    assert 0 < result["ssim"] < 1 and result["lpips"] > 0
    # PSNR from the reconstructions made here, with torchmetrics, image by image
    vae = load_vae(str(vae_ckpt))
    psnrs = []
    for path in sorted((real_set / "images").iterdir()):
        with Image.open(path) as image:
            x = square(image, 32)[None].float()
        with torch.no_grad():
            y = vae.decode(vae.encode(x / 127.5 - 1).mode())
        y = ((y.clamp(-1, 1) + 1) * 127.5).round() / 255
        psnrs.append(float(peak_signal_noise_ratio(y, x / 255, data_range=1.0)))
    assert result["psnr"] == pytest.approx(float(np.mean(psnrs)), rel=1e-4)


# -- bad input: an error before any image is generated, nothing that looks finished -------------
def _bad_eval(tmp_path, data_dir, *overrides):
    from sd_lightning.commands.eval import evaluate

    run = tmp_path / "bad"
    cfg = compose_config(["stage=eval", "trainer.accelerator=cpu", *overrides], run, data_dir)
    with pytest.raises(InputError) as caught:
        evaluate(cfg)
    assert not (run / "eval.json").exists() and not (run / "parts").exists()
    return str(caught.value)


@pytest.fixture
def bad_case(ldm_ckpt, eval_weights, real_set, tmp_path, data_dir):
    weights, folder = eval_weights

    def run(*overrides: str) -> str:
        base = {
            "ckpt": str(ldm_ckpt),
            "eval.inception": str(weights),
            "eval.clip.model": f"local-dir:{folder}",
            "eval.prompts": str(real_set / "captions.txt"),
            "eval.reference": str(real_set / "images"),
            "eval.feature_dim": "64",
            "eval.num_images": "67",
            "eval.stats_dir": str(tmp_path / "stats"),
            "steps": "2",
        }
        for o in overrides:
            key, _, value = o.partition("=")
            base[key] = value
        return _bad_eval(tmp_path, data_dir, *(f"{k}={v}" for k, v in base.items() if v != "~"))

    return run


def test_eval_refuses_bad_input_before_generating(bad_case, eval_weights, tmp_path, vae_ckpt):
    few = tmp_path / "few"
    few.mkdir()
    for i, image in enumerate(shapes(66, 32, seed=9)[0]):
        image.save(few / f"{i}.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    wrong = tmp_path / "wrong_inception.pth"
    state = torch.load(eval_weights[0], weights_only=True)
    state["Mixed_7c.branch1x1.conv.weight"] = torch.zeros(3, 3, 1, 1)
    torch.save(state, wrong)
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)

    cases = {
        f"eval.reference={few}": "has 66 usable images and eval.num_images=67",
        "eval.feature_dim=192": "FID with 192-d features needs at least 192 images",
        f"eval.reference={broken}": "has 0 usable images",
        f"eval.prompts={empty}": "holds no caption",
        f"eval.prompts={tmp_path / 'nope.txt'}": "eval.prompts=.*no such file",
        "eval.num_images=500": "holds 91 captions and eval.num_images=500",
        "eval.guidance=[1.5,abc]": r"'abc' is not a number >= 0",
        f"eval.inception={wrong}": "is not Inception-v3's FID weights.*Mixed_7c.branch1x1",
        f"eval.inception={pickled}": "cannot be read as a tensor file without pickle",
        f"vae_ckpt={vae_ckpt}": "evaluates one model.*both are given",
        f"ckpt={vae_ckpt}": "stage",
        "eval.resize=bilinear": "eval.resize='bilinear': choose clean, legacy_tensorflow",
        "eval.guidance=[2,2]": "given twice",
        f"eval.clip.model=ViT-B-32 eval.clip.pretrained={eval_weights[0]}": "quick_gelu=true",
    }
    import re

    for override, message in cases.items():
        text = bad_case(*override.split(" "))
        assert re.search(message, text, re.S), (override, text)


def test_missing_inception_weights_name_the_file_and_the_option(bad_case, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    text = bad_case("eval.inception=~")
    assert "weights-inception-2015-12-05-6726825d.pth" in text and "eval.inception=" in text


def test_every_eval_protocol_composes(cfg_factory):
    for option in sorted(
        p.stem for p in (Path(__file__).parents[1] / "conf" / "eval").glob("*.yaml")
    ):
        cfg = cfg_factory("stage=eval", f"eval={option}", tiny=False)
        assert cfg.eval.feature_dim == 2048 and cfg.eval.resize
    mlperf = cfg_factory("stage=eval", "eval=mlperf", tiny=False).eval
    assert (mlperf.resize, mlperf.reference_crop, list(mlperf.guidance)) == (
        "legacy_pytorch",
        "none",
        [8.0],
    )
    coco = cfg_factory("stage=eval", "eval=coco30k", tiny=False).eval
    assert (coco.num_images, coco.reference_crop, coco.resize) == (30000, "centre", "clean")


def test_coco_pick_is_mlperfs_and_the_folder_lists_as_the_captions(tmp_path):
    """sd_lightning.evaluation.coco against MLPerf's coco-split-resize.py run with pandas on
    the same annotations (images with 1 to 5 captions, ids not in image order)."""
    import pandas as pd

    from sd_lightning.evaluation import coco

    rng = np.random.default_rng(0)
    annotations, next_id = [], 7
    for image_id in rng.permutation(np.arange(100, 160)):
        for _ in range(int(rng.integers(1, 6))):
            annotations.append(
                {"image_id": int(image_id), "id": next_id, "caption": f" c{next_id}\n"}
            )
            next_id += int(rng.integers(1, 4))
    rng.shuffle(annotations)
    df = pd.DataFrame(annotations)
    df["caption"] = df["caption"].apply(lambda x: x.replace("\n", "").strip())
    df = df.sample(frac=1, random_state=2023).reset_index(drop=True)
    df = df.drop_duplicates(subset=["image_id"], keep="first")[:40].sort_values(by=["id"])

    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in {a["image_id"] for a in annotations}:
        Image.new("RGB", (30, 20), (image_id, 0, 0)).save(images / coco.image_name(image_id))
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": annotations}))
    out = tmp_path / "30k"
    source = ["--annotations", str(tmp_path / "captions.json"), "--images", str(images)]
    coco.main([*source, "--out", str(out), "--count", "40", "--squash", "16"])
    assert (out / "captions.txt").read_text().splitlines() == list(df["caption"])
    assert [int(i) for i in (out / "image_ids.txt").read_text().split()] == list(df["image_id"])
    listed = sorted((out / "images").iterdir())
    assert [int(p.stem.rsplit("_", 1)[1]) for p in listed] == list(df["image_id"])
    with Image.open(listed[0]) as first:
        assert first.size == (16, 16)
    with pytest.raises(SystemExit, match="is not empty"):  # old images would join the set
        coco.main([*source, "--out", str(out), "--count", "10"])


# -- during training ------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_callback_logs_at_its_steps_and_survives_preemption(
    ldm_cfg_factory, eval_weights, real_set, tmp_path
):
    """callbacks=eval every 2 steps; a stop at step 2 skips that evaluation, the resumed run
    makes it before its next step and goes on (2 and 4 logged once each, at their steps)."""
    from conftest import read_metrics

    from sd_lightning.commands.train import train

    weights, folder = eval_weights
    run = tmp_path / "run"
    options = [
        "callbacks=eval",
        "callbacks.eval.every_n_steps=2",
        "callbacks.eval.num_images=12",
        "callbacks.eval.steps=2",
        f"eval.prompts={real_set / 'captions.txt'}",
        f"eval.reference={real_set / 'images'}",
        f"eval.inception={weights}",
        f"eval.clip.model=local-dir:{folder}",
        "eval.feature_dim=64",
        "eval.kid_subsets=5",
        f"eval.stats_dir={tmp_path / 'stats'}",
        "logger=csv",
        "trainer.max_steps=4",
    ]
    signal = ["+callbacks.fault._target_=fault_injection.SignalAt", "+callbacks.fault.step=1"]
    cfg = ldm_cfg_factory(*options, *signal)
    cfg.paths.output_dir = str(run)
    train(cfg)
    assert sorted(os.listdir(run / "checkpoints")) == ["preempted-step00000002.ckpt"]
    assert not any("eval/fid" in row and row["eval/fid"] for row in read_metrics(run))

    cfg = ldm_cfg_factory(*options)
    cfg.paths.output_dir = str(run)
    train(cfg)
    evaluated = [
        (int(row["step"]), float(row["eval/fid"]))
        for row in read_metrics(run)
        if row.get("eval/fid")
    ]
    assert [step for step, _ in evaluated] == [2, 4]
    assert all(np.isfinite(fid) and fid > 0 for _, fid in evaluated)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in last["callbacks"].items() if k.startswith("Evaluation"))
    assert state == {"last_step": 4}


def test_prompts_keep_a_caption_whole_whatever_it_holds(tmp_path):
    """Only a newline ends a caption (MLPerf strips newlines only): a carriage return or a
    Unicode line separator inside one does not shift the captions after it."""
    from sd_lightning.evaluation.prompts import read_prompts

    path = tmp_path / "captions.txt"
    path.write_bytes("a cat\r\na dog\u2028on a mat\na bird \x0c sings\r\n".encode())
    assert read_prompts(str(path), 3) == ["a cat", "a dog\u2028on a mat", "a bird \x0c sings"]


def test_clip_weights_from_a_file_run_with_the_activation_given(tmp_path):
    """A weights file does not record QuickGELU: eval.clip.quick_gelu decides, and eval.json
    says which ran (an OpenAI tower with GELU would score wrong without a word)."""
    import open_clip
    from eval_fixtures import TINY_CLIP
    from safetensors.torch import save_file

    from sd_lightning.evaluation.clip_score import ClipScorer

    config = {k: v for k, v in TINY_CLIP["model_cfg"].items() if k != "quick_gelu"}
    (tmp_path / "TinyCLIP-file-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "TinyCLIP-file-test.json"))
    weights = tmp_path / "open_clip_model.safetensors"
    state = open_clip.create_model("TinyCLIP-file-test").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    images, captions = shapes(3, 48, seed=8)
    scores = {}
    for quick in (True, False):
        scorer = ClipScorer("TinyCLIP-file-test", str(weights), quick_gelu=quick)
        assert scorer.activation == ("quick_gelu" if quick else "gelu")
        scores[quick] = scorer(uint8(images), captions)
    assert not torch.allclose(scores[True], scores[False])
