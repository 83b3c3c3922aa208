"""The ``tokenizer/`` folder of an exported diffusers pipeline: transformers' ``CLIPTokenizer`` files
(vocab.json, merges.txt, configs) built from the OpenAI CLIP BPE bundled with open_clip, the one our
text encoder tokenizes with, so diffusers gets our text encoder's ids without downloading anything.
SD 1.x pads prompts with end-of-text, SD 2.x with "!" (id 0)."""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
PADS = {"eot": EOS, "zero": "!"}  # SD 1.x (openai/clip-vit-large-patch14), SD 2.x
_MERGES = 49152 - 256 - 2  # the merges open_clip's SimpleTokenizer uses (48894)


def clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """The vocabulary (list index = token id) and ranked merges exactly as open_clip's
    ``SimpleTokenizer`` builds them: byte characters, the same with ``</w>``, merged pairs, then
    the start- and end-of-text tokens (49406, 49407) under the names transformers uses."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    pairs = [line.split() for line in lines[1 : _MERGES + 1]]  # line 0: a header
    if len(pairs) != _MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{default_bpe()} is not the CLIP BPE ({len(pairs)} merges)")
    merges = [(a, b) for a, b in pairs]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return vocab, merges


def _token(content: str) -> dict[str, Any]:
    """A special token as openai/clip-vit-large-patch14's tokenizer files spell it."""
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
    }


def _special_tokens(pad: str) -> dict[str, Any]:
    return {
        "bos_token": _token(BOS),
        "eos_token": _token(EOS),
        "unk_token": _token(EOS),
        "pad_token": pad,
    }


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_clip_tokenizer(folder: str, pad: str = "eot", context_length: int = 77) -> str:
    """Write a transformers CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) equal to SD's: pad="eot" -> pad token "<|endoftext|>" (SD 1.x,
    openai/clip-vit-large-patch14), pad="zero" -> pad token "!" (id 0; SD 2.x's tokenizer).
    Unlike SD's, it reads special-token text in prompts ("!" included) as plain text, as open_clip
    does. Returns the folder."""
    if pad not in PADS:
        raise ValueError(f"pad must be one of {sorted(PADS)}, got {pad!r}")
    vocab, merges = clip_bpe()
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = _special_tokens(PADS[pad])
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        # Text like "!" or "<|endoftext|>" in a prompt is plain text to open_clip: without this,
        # transformers matches special tokens inside prompts, so SD 2's pad "!" gives 0, not 256
        # (stabilityai's own tokenizer does, diffusers issue #4153)
        "split_special_tokens": True,
        **{
            k: {**v, "__type": "AddedToken"} if isinstance(v, dict) else v
            for k, v in special.items()
        },
    }
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    return folder
