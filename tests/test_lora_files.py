"""LoRA files as the tools people use write and read them. Reading: the files diffusers' own
training scripts save (``convert_state_dict_to_diffusers`` of a peft state, with and without its
adapter metadata) and kohya files in CompVis names merge into the same functions as diffusers'
``load_lora_weights`` gives (the oracle, test-only). Writing: every tensor of both our files is
taken by ComfyUI's key rules, and our kohya metadata files a LoRA as AUTOMATIC1111 and kohya
expect. Where a tool other than diffusers is the judge, its rules are written out here from its
source: ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``) and
``comfy/weight_adapter/lora.py`` (``LoRAAdapter.load``); AUTOMATIC1111's
``extensions-builtin/Lora/network.py`` (``NetworkOnDisk.detect_version``); kohya's
``library/model_util.py`` (``get_model_version_str_for_sd1_sd2``) and ``library/sai_model_spec.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA_TINY, compose_config
from safetensors.torch import load_file, save_file

from sd_lightning.core.errors import InputError
from sd_lightning.finetune.lora_files import kohya_metadata
from sd_lightning.weights import layouts

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def base(small_base):
    return small_base


def _pipe(base):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 7, 64, generator=g),
    )


def _theirs(pipe):
    x, t, ctx = _inputs()
    with torch.no_grad():
        text, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        return text, pipe.unet(x, t, encoder_hidden_states=ctx).sample


def _ours(base, files, **load):
    from sd_lightning.commands.open import apply_loras, load_ldm

    system = load_ldm(str(base))
    apply_loras(system, [str(f) for f in files], 1.0)
    x, t, ctx = _inputs()
    with torch.no_grad():
        return system.encode_text([PROMPT]), system.unet(x, t, ctx)


def _same(ours, theirs, what):
    for a, b, part in zip(ours, theirs, ("text states", "U-Net")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{what}: {part}")


def _diffusers_script_lora(base, out, alpha: int):
    """What diffusers' train_dreambooth_lora.py saves: peft adapters on both networks, converted
    by ``convert_state_dict_to_diffusers``, with peft's config as adapter metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = _pipe(base)
    unet_cfg = LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
    )
    text_cfg = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj"])
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(text_cfg, pipe.text_encoder)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for net in (pipe.unet, pipe.text_encoder):
            for name, p in net.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(out),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder)
        ),
        unet_lora_adapter_metadata=unet_cfg.to_dict() if alpha != 4 else None,
        text_encoder_lora_adapter_metadata=text_cfg.to_dict() if alpha != 4 else None,
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("alpha", [4, 8], ids=["no-metadata", "alpha-in-metadata"])
def test_diffusers_training_script_loras_merge_as_diffusers_loads_them(tmp_path, base, alpha):
    path = _diffusers_script_lora(base, tmp_path / "lora", alpha)
    keys = load_file(path)
    assert any(k.endswith("to_q.lora.down.weight") for k in keys)  # the scripts' spelling
    assert any("lora_linear_layer" in k for k in keys)
    pipe = _pipe(base)
    pipe.load_lora_weights(str(path))
    _same(_ours(base, [path]), _theirs(pipe), f"alpha {alpha}")


def test_kohya_files_in_compvis_names_merge_as_diffusers_loads_them(tmp_path, base):
    """Kohya-style names over the original (SGM/CompVis) module paths, as ComfyUI and some
    converters write them; diffusers maps them with the U-Net's config."""
    from sd_lightning.finetune.lora_keys import read_pairs

    path = _diffusers_script_lora(base, tmp_path / "lora", 4)
    pairs = read_pairs(load_file(path), str(path))
    unet = _pipe(base).unet
    from sd_lightning.weights.configs import unet_config_from_diffusers

    blocks = layouts.unet_blocks(unet_config_from_diffusers(dict(unet.config), "test"))
    kohya = {}
    for name, parts in pairs["unet"].items():
        module = next(m for m, _ in unet.named_modules() if m.replace(".", "_") == name)
        compvis = layouts.rename(module + ".weight", blocks, to_diffusers=False)
        stem = "lora_unet_" + compvis.removesuffix(".weight").replace(".", "_")
        kohya[stem + ".lora_down.weight"], kohya[stem + ".lora_up.weight"] = (
            parts["down"],
            parts["up"],
        )
        kohya[stem + ".alpha"] = torch.tensor(2.0)  # scale 2 / 4
    assert any(k.startswith("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1") for k in kohya)
    compvis_file = tmp_path / "compvis.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, compvis_file)
    pipe = _pipe(base)
    pipe.load_lora_weights(str(compvis_file), unet_config=pipe.unet.config)
    theirs = _theirs(pipe)[1]
    torch.testing.assert_close(_ours(base, [compvis_file])[1], theirs, atol=1e-5, rtol=1e-4)


# -- the other tools' rules, as their sources state them ----------------------------------------
COMFY_SUFFIXES = [  # LoRAAdapter.load: (up, down) spellings, tried in this order
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
]
COMFY_CLIP = ["mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
COMFY_CLIP.append("self_attn.out_proj")


def comfy_key_map(diffusers_unet_keys: list[str], text_layers: int) -> set[str]:
    """The LoRA layer names ComfyUI maps for an SD 1/2 model, from the U-Net's diffusers weight
    names (``unet_to_diffusers``) and the text encoder's layers (``model_lora_keys_clip``)."""
    names = set()
    for k in diffusers_unet_keys:
        if not k.endswith(".weight"):
            continue
        path = k[: -len(".weight")]
        names.add("lora_unet_" + path.replace(".", "_"))
        for prefix in ("", "unet."):
            key = prefix + path.replace(".to_", ".processor.to_")
            names.add(key[:-2] if key.endswith(".to_out.0") else key)
    for b in range(text_layers):
        for c in COMFY_CLIP:
            names.add(f"lora_te_text_model_encoder_layers_{b}_{c.replace('.', '_')}")
            names.add(f"text_encoder.text_model.encoder.layers.{b}.{c}")
    return names


def comfy_loaded(keys: set[str], key_map: set[str]) -> set[str]:
    loaded = set()
    for x in key_map:
        for up, down in COMFY_SUFFIXES:
            if x + up in keys:
                loaded |= {x + up, x + down} & keys
                loaded |= {x + ".alpha"} & keys  # the scale: alpha / rank, else 1
                break
    return loaded


def a1111_version(metadata: dict[str, str]) -> str:
    """``NetworkOnDisk.detect_version``."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def test_comfyui_takes_every_tensor_of_both_our_lora_files(tmp_path, data_dir, base):
    from safetensors import safe_open

    from sd_lightning.commands.train import train

    run = tmp_path / "run"
    train(
        compose_config(
            [
                *DATA_TINY,
                "experiment=lora",
                f"pretrained={base}",
                "finetune.rank=4",
                "finetune.targets=all",  # attention, feed-forward, projections, convolutions
                "finetune.text_encoder=true",
                "trainer.max_steps=1",
                "model.val_prompts=[]",
            ],
            run,
            data_dir,
        )
    )
    pipe = _pipe(base)
    key_map = comfy_key_map(
        list(pipe.unet.state_dict()), pipe.text_encoder.config.num_hidden_layers
    )
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        keys = set(load_file(run / "export" / name))
        missing = keys - comfy_loaded(keys, key_map)
        assert not missing, (name, sorted(missing)[:5])  # "lora key not loaded" in ComfyUI
    with safe_open(str(run / "export" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v2"] == "False" and a1111_version(meta) == "SD1"


@pytest.mark.parametrize(
    ("context", "prediction", "version", "architecture", "a1111"),
    [
        (768, "epsilon", "sd_v1", "stable-diffusion-v1/lora", "SD1"),
        (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "SD2"),
        (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    ],
)
def test_kohya_metadata_files_a_lora_under_its_family(
    context, prediction, version, architecture, a1111
):
    meta = kohya_metadata(16, 8.0, context, prediction, 768)
    assert meta["ss_base_model_version"] == version
    assert meta["modelspec.architecture"] == architecture
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert a1111_version(meta) == a1111


def test_lora_files_we_cannot_apply_whole_are_refused_naming_the_tensor(tmp_path, base):
    from sd_lightning.commands.open import apply_loras, load_ldm

    path = _diffusers_script_lora(base, tmp_path / "lora", 4)
    good = load_file(path)
    system = load_ldm(str(base))
    first = next(k for k in good if k.endswith("to_q.lora.down.weight"))
    cases = {
        "sdxl": (
            {
                **good,
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": good[first],
                "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": good[first].T,
            },
            "adapts SDXL's second text encoder, which this model lacks",
        ),
        "dora": ({**good, first.replace("lora.down.weight", "dora_scale"): good[first]}, "DoRA"),
        "no-up": (
            {k: v for k, v in good.items() if k != first.replace("down", "up")},
            "has no up matrix",
        ),
        "nan": ({**good, first: good[first] * float("nan")}, "NaN or infinite"),
        "wider": ({**good, first: torch.zeros(4, 96)}, r"is 32x96 .* this model.s weight is 32x32"),
    }
    for what, (state, message) in cases.items():
        bad = tmp_path / f"{what}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in state.items()}, bad)
        with pytest.raises(InputError, match=message):
            apply_loras(system, [str(bad)], 1.0)
    with pytest.raises(InputError, match="lora_scale=nan"):
        apply_loras(system, [str(path)], float("nan"))
