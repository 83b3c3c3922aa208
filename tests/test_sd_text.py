"""SD's text encoders against their references: transformers' ``CLIPTextModel`` (the oracle,
test-only) and the configs SD's releases publish. The presets build the reference architecture
without their weights; diffusers folders are read by every size their configs record (heads that
are not 64 wide, GELU or quick-GELU, layer-norm epsilon, the tokenizer's padding); our single
files read back exactly, SD 2's at the layer SD reads, by every tool's rule."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sd_fixtures import pipeline_folder

from sd_lightning.conditioning import OpenCLIPTextEncoder
from sd_lightning.weights.clip import openclip_from_hf
from sd_lightning.weights.openclip import activation, tag_quick_gelu, text_tower

transformers = pytest.importorskip("transformers")

# The text encoders of SD's releases as their config.json files publish them
# (openai/clip-vit-large-patch14's text_config, SD 1.x's text_encoder/; stabilityai/
# stable-diffusion-2-1's text_encoder/, which keeps 23 of OpenCLIP ViT-H/14's 24 blocks)
SD1_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    max_position_embeddings=77,
    vocab_size=49408,
)
SD2_TEXT = {**SD1_TEXT, "hidden_size": 1024, "intermediate_size": 4096}
SD2_TEXT.update(num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu")
PROMPTS = ["a photo of an astronaut riding a horse!", "a red circle"]


def _states(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).last_hidden_state


def _padded(ours: OpenCLIPTextEncoder, prompts: list[str]) -> torch.Tensor:
    """The ids our encoder runs: its tokenizer's, after end-of-text padded as it pads."""
    tokens = ours.tokenizer(prompts)
    if ours.pad_eot:
        eot = ours.tokenizer.eot_token_id
        tokens = torch.where((tokens == eot).cumsum(-1) > 0, eot, tokens)
    return tokens


@pytest.mark.parametrize(
    ("preset", "reference"), [("clip_vit_l", SD1_TEXT), ("openclip_vit_h", SD2_TEXT)]
)
def test_text_encoder_presets_build_the_architecture_of_sds_text_encoders(
    cfg_factory, preset, reference
):
    cfg = cfg_factory("stage=ldm", f"text_encoder={preset}", tiny=False).text_encoder
    with torch.device("meta"):  # the architecture the weights land in, nothing allocated
        tower = text_tower(cfg.name, cfg.quick_gelu)
    block = tower.transformer.resblocks[0]
    skip = {"last": 0, "penultimate": 1}[cfg.layer]
    built = dict(
        hidden_size=tower.transformer.width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_attention_heads=block.attn.num_heads,
        num_hidden_layers=len(tower.transformer.resblocks) - skip,
        hidden_act=activation(tower),
        layer_norm_eps=tower.ln_final.eps,
        max_position_embeddings=tower.context_length,
        vocab_size=tower.vocab_size,
    )
    assert built == reference
    # a config that leaves the activation open gets the one the tag's weights were trained with
    assert tag_quick_gelu("ViT-L-14", "openai") and not tag_quick_gelu(
        "ViT-H-14", "laion2b_s32b_b79k"
    )


def test_clip_vit_l_runs_sd1s_text_encoder_as_transformers_does(cfg_factory, tmp_path):
    """The preset at full size, given OpenAI-shaped weights (random, half precision to keep the
    file small), gives transformers' CLIPTextModel's states for SD 1's padding."""
    config = transformers.CLIPTextConfig(**SD1_TEXT)
    theirs = transformers.CLIPTextModel(config).eval()
    state = {k: v.half().float() for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state, strict=False)
    weights = openclip_from_hf(state, "test")
    weights["text_projection"] = torch.randn(768, 768)  # in OpenAI's file, unused by SD
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in weights.items()}, path)
    cfg = cfg_factory(
        "stage=ldm", "text_encoder=clip_vit_l", f"text_encoder.pretrained={path}", tiny=False
    )
    from hydra.utils import instantiate

    ours = instantiate(cfg.text_encoder)
    expected = _states(theirs, _padded(ours, PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPTS), expected, atol=1e-4, rtol=1e-4)


FOLDERS = {  # unlike SD's: 8- and 16-wide heads, 3 layers, another epsilon
    "sd1-like": dict(heads=4, act="quick_gelu"),
    "sd2-like": dict(heads=8, act="gelu", layer_norm_eps=1e-6),
}


@pytest.mark.parametrize("kind", FOLDERS)
def test_a_diffusers_folders_text_encoder_is_read_by_every_size_its_config_records(tmp_path, kind):
    folder, *_, text, _ = pipeline_folder(tmp_path, text=FOLDERS[kind])
    ours = OpenCLIPTextEncoder(pretrained=str(folder), layer="auto")
    assert ours.pad_eot == (kind == "sd1-like")  # from the folder's tokenizer/
    assert ours.tower.transformer.resblocks[0].attn.num_heads == FOLDERS[kind]["heads"]
    with torch.no_grad():
        torch.testing.assert_close(
            ours(PROMPTS), _states(text, _padded(ours, PROMPTS)), atol=1e-5, rtol=1e-4
        )


def _export_single(tmp_path, folder, *more: str):
    from conftest import compose_config

    from sd_lightning.commands.export import export

    out = tmp_path / "exported.safetensors"
    cfg = compose_config(
        ["stage=export", f"ckpt={folder}", "format=single_file", f"output={out}", *more],
        tmp_path / "export_run",
        tmp_path,
    )
    export(cfg)
    return out


@pytest.mark.parametrize("kind", FOLDERS)
def test_our_single_file_of_a_folder_reads_back_to_the_same_states(tmp_path, kind):
    """Single files do not show the heads (tools assume 64-wide ones): ours record them, and an
    SD 2 folder's 23 blocks go out as SD 2 files hold them, 24 read at the penultimate."""
    folder, *_, text, _ = pipeline_folder(tmp_path, text=FOLDERS[kind])
    single = _export_single(tmp_path, folder)
    ours = OpenCLIPTextEncoder(pretrained=str(single), layer="auto")
    expected = _states(text, _padded(ours, PROMPTS))
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPTS), expected, atol=1e-5, rtol=1e-4)
    if kind == "sd1-like":
        return
    with safe_open(str(single), "pt") as f:
        blocks = {k.split(".")[4] for k in f.keys() if ".resblocks." in k}
    assert len(blocks) == 4  # the folder's 3 and one that adds nothing
    assert ours.skip == 1  # the file's penultimate block, as SD 2 is read
    # a reader that runs every block of the file (clip skip 1 in other tools) gets the same
    last = OpenCLIPTextEncoder(pretrained=str(single), layer="last")
    with torch.no_grad():
        torch.testing.assert_close(last(PROMPTS), expected, atol=1e-5, rtol=1e-4)


def test_an_openclip_tag_not_in_the_cache_fails_at_once_offline(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from sd_lightning.core.errors import InputError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never a download in tests
    start = time.monotonic()
    with pytest.raises(InputError, match=r"not in the cache .* text_encoder.pretrained=/path"):
        OpenCLIPTextEncoder(name="ViT-L-14", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 5
