"""The ``tokenizer/`` folder written for diffusers exports: transformers' ``CLIPTokenizer`` loads
it and gives, for SD 1.x (padded with end-of-text) and SD 2.x (padded with "!", id 0), exactly the
ids of open_clip's ``SimpleTokenizer``, the tokenizer our text encoder uses."""

from __future__ import annotations

import json
import os

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from sd_lightning.weights.tokenizer import write_clip_tokenizer

transformers = pytest.importorskip("transformers")

SOT, EOT = 49406, 49407
LONG = "a very detailed painting of a castle on a hill at sunset, " * 6
# Left out on purpose: transformers 5's CLIPTokenizer (tokenizers-backed, no ftfy) runs NFC,
# whitespace and lowercase only, while open_clip also runs ftfy.fix_text, html.unescape and Python's
# str.lower. So these differ by library, not by our files: HTML entities ("&amp;"), curly quotes,
# ligatures ("ﬁ", "ǅ"), full-width letters, mojibake ("cafÃ©"), Greek final sigma ("ΣΑΣ"), and
# open_clip 3's own special-token text "<start_of_text>" / "<end_of_text>".
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A PORTRAIT OF A Cat, Oil On Canvas",
    "hello, world! (really?) -- yes; no... #tag @user 'quoted' \"double\"",
    "! !! !!! wow!?!",  # "!" is SD 2's pad token: still 256 ("!</w>") in text, as in open_clip
    "a <|endoftext|> b <|startoftext|>",  # plain text to open_clip 3
    "1234 apples, 5.67 kg, year 2024-01-02",
    "   lots   of\twhite\n\nspace   ",
    "café naïve Zürich",
    "a cute 🐱 in a 🚀, ✨",
    "don't it's we're they've I'm you'll he'd",
    "日本語のテキスト and 中文",
    "",
    LONG,
]


def _open_clip_ids(pad: str) -> list[list[int]]:
    """open_clip's ids, padded the way SD's own tokenizer pads them."""
    ids = SimpleTokenizer(context_length=77)(PROMPTS)  # padded with 0, i.e. "!" (SD 2.x)
    if pad == "eot":  # SD 1.x: end-of-text after the first end-of-text, as our text encoder does
        ids = torch.where((ids == EOT).cumsum(-1) > 0, EOT, ids)
    return ids.tolist()


def _tokenizers(folder: str) -> list:
    classes = [transformers.CLIPTokenizer, transformers.AutoTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:  # one class in transformers 5
        classes.append(fast)
    return [cls.from_pretrained(folder) for cls in classes]


@pytest.mark.parametrize("pad", ["eot", "zero"])
def test_ids_match_open_clip(tmp_path, pad: str) -> None:
    folder = write_clip_tokenizer(str(tmp_path / "tokenizer"), pad=pad)
    assert sorted(os.listdir(folder)) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    expected = _open_clip_ids(pad)
    assert len(SimpleTokenizer().encode(LONG)) > 77  # really truncated
    for tok in _tokenizers(folder):
        assert len(tok) == 49408
        assert tok.pad_token_id == {"eot": EOT, "zero": 0}[pad]
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (SOT, EOT, EOT)
        assert tok.model_max_length == 77
        got = tok(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
        for prompt, ids, want in zip(PROMPTS, got, expected):
            assert ids == want, prompt
        assert got[-1][-1] == EOT and expected[-1][-1] == EOT  # the truncated prompt


def test_files_match_open_clip(tmp_path) -> None:
    folder = write_clip_tokenizer(str(tmp_path), pad="zero", context_length=64)
    simple = SimpleTokenizer()
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    renamed = {"<|startoftext|>": simple.sot_token_id, "<|endoftext|>": simple.eot_token_id}
    ours = {k: v for k, v in simple.encoder.items() if v not in renamed.values()}
    assert vocab == {**ours, **renamed} and len(vocab) == 49408
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split()) for line in lines[1:]] == sorted(
        simple.bpe_ranks, key=simple.bpe_ranks.get
    )
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 64
    assert config["do_lower_case"] is True and config["pad_token"] == "!"
    assert transformers.CLIPTokenizer.from_pretrained(folder).model_max_length == 64


def test_bad_pad(tmp_path) -> None:
    with pytest.raises(ValueError, match="pad"):
        write_clip_tokenizer(str(tmp_path), pad="eos")
