"""One reader for every weight file a user names (``ckpt=``, ``ckpt_path=``, ``vae_ckpt=``...).

The file's kind comes from its bytes, not its name: a Lightning/torch checkpoint (a zip, loaded
with ``torch.load(weights_only=True)``), a safetensors file, or a folder of
``torch.distributed.checkpoint`` shards (``trainer=fsdp``). Whatever goes wrong (no such file,
an empty or truncated file, a text file, a file that needs pickle, the wrong stage) is a
:class:`WeightFileError` that names the option, the file and what the option takes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sd_lightning.core.errors import InputError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_PROTOCOLS = range(2, 6)  # a pickle starts with PROTO (0x80) and its protocol, 2 to 5
CONVERT = (
    'if you trust the file, convert it once: python -c "import torch; from safetensors.torch '
    "import save_file; sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', "
    "sd); save_file({{k: v.contiguous() for k, v in sd.items()}}, '{stem}.safetensors')\""
)


SHARDED_META = "meta.pt"  # what Lightning calls the non-tensor part of a sharded checkpoint


def sharded_meta(folder: str) -> str:
    """The ``meta.pt`` of a complete sharded checkpoint; ``FileNotFoundError`` when the folder
    lacks it or the shards' index (``.metadata``, written after every shard)."""
    meta = os.path.join(folder, SHARDED_META)
    if not os.path.isfile(meta) or not os.path.isfile(os.path.join(folder, ".metadata")):
        raise FileNotFoundError(
            f"{folder!r} is a folder but not a complete sharded checkpoint (no .metadata or "
            f"{SHARDED_META})"
        )
    return meta


class WeightFileError(InputError):
    """A file given for ``option`` is missing, unreadable or not what the option takes."""

    def __init__(self, option: str, path: str, problem: str, expected: str, advice: str = ""):
        super().__init__(
            f"{option}={path!r} {problem}: give {expected}" + (advice and f"; {advice}")
        )
        self.option, self.path = option, path


@dataclass
class WeightFile:
    """What :func:`read_weight_file` found. ``kind``: ``checkpoint`` (``content`` is the loaded
    dict), ``safetensors`` (``metadata`` holds its header's JSON-decoded metadata; the tensors
    are read on demand with :meth:`tensors`) or ``sharded`` (a folder; ``content`` is its
    ``meta.pt``)."""

    option: str
    path: str
    expected: str
    kind: str
    content: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str | None:
        """The sd_lightning stage that wrote it (None: not one of ours)."""
        if self.kind == "safetensors":
            return self.metadata.get("stage")
        meta = self.content.get("sd_lightning") if isinstance(self.content, dict) else None
        return (meta or {}).get("stage")

    def lazy_tensors(self, meta: bool = False) -> Mapping[str, torch.Tensor]:
        """The tensors, each read only when looked up: a safetensors file through its memory map,
        a torch file as loaded (open it with ``mmap=True`` for the same effect). ``meta``: only
        their shapes (tensors on the meta device; nothing is read)."""
        if self.kind != "safetensors":
            state = self.content.get("state_dict", self.content)
            return {
                k: v.to("meta") if meta else v
                for k, v in state.items()
                if isinstance(v, torch.Tensor)
            }
        from safetensors import safe_open

        try:
            return _Safetensors(safe_open(self.path, framework="pt"), meta)
        except Exception as exn:  # noqa: BLE001 - a damaged file is the user's to fix
            raise self.error(f"is a damaged safetensors file ({exn})") from None

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(self.path)
        except Exception as exn:  # noqa: BLE001 - a damaged file is the user's to fix
            raise self.error(f"is a damaged safetensors file ({exn})") from None

    def error(self, problem: str, advice: str = "") -> WeightFileError:
        return WeightFileError(self.option, self.path, problem, self.expected, advice)

    def require_stage(self, stage: str | tuple[str, ...], exports: bool = True) -> None:
        """Refuse a file not written by ``stage`` (or one of them), or (``exports=False``) a
        safetensors export where the option needs a whole checkpoint."""
        found = self.stage
        what = "an export" if self.kind == "safetensors" else "a checkpoint"
        if found is None:
            raise self.error(f"is {what} without sd_lightning's stage record (not one of ours)")
        stages = (stage,) if isinstance(stage, str) else tuple(stage)
        if found not in stages:
            wanted = " or ".join(repr(s) for s in stages)
            raise self.error(f"is {what} of stage {found!r}, not stage {wanted}")
        stage = found
        if self.kind == "safetensors" and not exports:
            raise self.error(
                f"is the weights-only export of a stage={stage} run, not its checkpoint"
            )


def identify(keys: list[str], stage: str | None = None) -> str | None:
    """What a weights file is, from its tensor names: for the error when it is given to an
    option that takes something else (``None``: nothing we know)."""
    if stage:
        return f"a stage={stage} file of sd_lightning"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        return "a LoRA file (give it to lora=[...] of stage=sample or stage=export)"
    if "emb_params" in keys or (len(keys) == 1 and keys[0].startswith("<")):
        return "a textual-inversion embedding (give it to embeddings=[...] of stage=sample)"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a whole Stable Diffusion single file"
    if any(k.startswith(("first_stage_model.", "encoder.conv_in.")) for k in keys):
        return "a VAE"
    if any(
        k.startswith(("cond_stage_model.", "text_model.", "transformer.resblocks.")) for k in keys
    ):
        return "a text encoder"
    if any(k.startswith(("down_blocks.", "input_blocks.")) for k in keys):
        return "a U-Net"
    return None


def identify_folder(folder: str) -> str | None:
    """What a diffusers/transformers component folder is, from its ``config.json``."""
    path = os.path.join(folder, "config.json")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return "a diffusers pipeline folder"
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError:
        return None
    name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    kinds = {
        "UNet2DConditionModel": "a diffusers U-Net folder (unet/)",
        "AutoencoderKL": "a diffusers VAE folder (vae/)",
        "CLIPTextModel": "a text encoder folder (text_encoder/)",
        "CLIPTextModelWithProjection": "a text encoder folder (text_encoder_2/)",
    }
    return kinds.get(name, f"a {name} folder" if name else None)


class _Safetensors(Mapping):
    """A safetensors file as a read-only mapping; a tensor is read when it is looked up, so a
    reader that takes one part of a whole Stable Diffusion file reads only that part."""

    def __init__(self, handle: Any, meta: bool = False):
        self._handle, self._keys, self._meta = handle, list(handle.keys()), meta
        self._names = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._meta:
            return torch.empty(self._handle.get_slice(key).get_shape(), device="meta")
        return self._handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Truncated(Exception):
    """A safetensors file shorter than its header says: ``args``: (bytes there, bytes needed)."""


def _safetensors_metadata(path: str, head: bytes, size: int) -> dict[str, Any] | None:
    """The metadata of a safetensors file (values JSON-decoded where they are JSON), or None when
    the bytes are not one; :class:`_Truncated` when the file ends before its header or tensors
    do."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length + 8 > size:
        if length < 1 << 30:  # a plausible header: the file was cut inside it
            raise _Truncated(size, length + 8)
        return None
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return None
    if not isinstance(header, dict):
        return None
    entries = [v for k, v in header.items() if k != "__metadata__"]
    if not all(isinstance(v, dict) and len(v.get("data_offsets", ())) == 2 for v in entries):
        return None  # JSON, but not a safetensors header
    ends = [v["data_offsets"][1] for v in entries]
    if 8 + length + max(ends, default=0) > size:
        raise _Truncated(size, 8 + length + max(ends))
    meta = header.get("__metadata__") or {}
    out = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def _describe(head: bytes) -> str:
    if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
        return f"is a text file (it starts with {head[:40].decode('ascii', 'replace')!r})"
    return f"is not a checkpoint or a safetensors file (it starts with {head[:8]!r})"


def read_weight_file(
    path: str | os.PathLike | None, option: str, expected: str, mmap: bool = False
) -> WeightFile:
    """Open ``path`` (given as ``option``) for what ``expected`` describes. ``mmap``: map a
    checkpoint's tensors instead of reading them (enough to check its stage and step)."""
    path = "" if path is None else os.fspath(path)
    if not path or not os.path.exists(path):
        raise WeightFileError(option, path, "does not exist", expected)
    if os.path.isdir(path):
        return _read_folder(path, option, expected)
    size = os.path.getsize(path)
    if size == 0:
        raise WeightFileError(option, path, "is an empty file (an interrupted copy?)", expected)
    with open(path, "rb") as f:
        head = f.read(256)
    found = WeightFile(option, path, expected, kind="checkpoint")
    # by full signatures, safetensors first: its 8-byte header length can begin with any byte,
    # 0x80 (a pickle's first byte) included, but then comes a JSON header that parses
    try:
        metadata = _safetensors_metadata(path, head, size)
    except _Truncated as cut:
        there, needed = cut.args
        raise found.error(
            f"is damaged or incomplete (a safetensors file cut short: {there:,} of its "
            f"{needed:,} bytes; an interrupted download or copy?)"
        ) from None
    if metadata is not None:
        found.kind, found.metadata = "safetensors", metadata
        return found
    if head.startswith(ZIP_MAGIC) or _is_pickle(head):
        found.content = _torch_load(found, mmap and head.startswith(ZIP_MAGIC))
        return found
    raise found.error(_describe(head))


def _is_pickle(head: bytes) -> bool:
    """A pickle (torch.save's legacy format, or any other): PROTO and a protocol of 2 to 5."""
    return len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS


def _torch_load(found: WeightFile, mmap: bool) -> dict[str, Any]:
    import pickle

    try:
        content = torch.load(found.path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exn:
        if "weights_only" not in str(exn).lower():
            raise found.error(f"is damaged ({_first_line(exn)})") from None
        stem = os.path.splitext(found.path)[0]
        raise found.error(
            "needs pickle to load (it holds Python objects besides tensors, and unpickling can "
            "run code), so it is refused",
            CONVERT.format(path=found.path, stem=stem),
        ) from None
    except Exception as exn:  # noqa: BLE001 - truncated zips and the like
        raise found.error(f"is damaged or incomplete ({_first_line(exn)})") from None
    if not isinstance(content, dict):
        raise found.error(f"holds a {type(content).__name__}, not a checkpoint dict")
    return content


def _first_line(exn: BaseException) -> str:
    return (str(exn).strip().splitlines() or [type(exn).__name__])[0][:200]


def _read_folder(path: str, option: str, expected: str) -> WeightFile:
    meta = os.path.join(path, SHARDED_META)
    if not os.path.isfile(meta) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise WeightFileError(
            option,
            path,
            f"is a folder but not a complete sharded checkpoint (no .metadata or {SHARDED_META})",
            expected,
        )
    found = WeightFile(option, path, expected, kind="sharded")
    inner = read_weight_file(meta, option, expected)
    found.content = inner.content
    return found
