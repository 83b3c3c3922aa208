"""Loading a whole Stable Diffusion 1.5 single file: seconds and peak memory; prints a markdown
table and writes it to docs/benchmarks/sd_load.md.

    .venv/bin/python benchmarks/sd_load.py                    # a random float32 file (4.3 GB)
    .venv/bin/python benchmarks/sd_load.py --dtype fp32 fp16  # and the -fp16 variant (2.1 GB)
    .venv/bin/python benchmarks/sd_load.py --build-only /data/sd15.safetensors --dtype fp16
    .venv/bin/python benchmarks/sd_load.py --file /data/sd15.safetensors  # reuse a file (kept)

The file holds our networks at SD 1.5's size with random weights, in the original single-file
layout (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``
+ transformers' CLIP ViT-L/14 text names), like ``v1-5-pruned-emaonly.safetensors``. It is built
in its own process and, unless given with ``--file``, in a temporary folder deleted at the end.

Each measurement runs in a fresh process: imports and preparation first (not timed), then the
call, timed from call to return. Memory: the process's RSS after the imports (the baseline),
its peak (``ru_maxrss``), and, sampled every 10 ms from ``/proc/self/status``, the peaks of its
anonymous and file-mapped parts. The page cache is warm (one untimed read of the file first);
"cold" rows evict the file's pages (``posix_fadvise(DONTNEED)`` on that file alone) before
each run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks", "sd_load.md")
GIB = 2**30
MARK = "SD_LOAD_RESULT "
# SD 1's text encoder: CLIP ViT-L/14's text tower
CLIP_L = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
TEXT_PREFIX = "cond_stage_model.transformer."
HF_TEXT = "text_model."  # where single files keep the CLIP text weights (transformers 4's names)
SAFETENSORS_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


# -- the file -------------------------------------------------------------------------------------
def sd15_configs():
    """``conf/unet/sd15.yaml`` and ``conf/vae/sd.yaml`` (at 512 px) as OmegaConf nodes."""
    from omegaconf import OmegaConf

    unet = OmegaConf.load(os.path.join(ROOT, "conf", "unet", "sd15.yaml"))
    vae = OmegaConf.load(os.path.join(ROOT, "conf", "vae", "sd.yaml"))
    vae.resolution = 512
    return unet, vae


def build_file(path: str, dtype: str) -> None:
    """SD 1.5's three networks with random weights, saved as one original-layout file."""
    import torch
    from hydra.utils import instantiate
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_lightning.weights.layouts import to_original

    torch.manual_seed(0)
    cast = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    unet_cfg, vae_cfg = sd15_configs()
    state = to_original(instantiate(unet_cfg).state_dict(), "unet")
    state.update(to_original(instantiate(vae_cfg).state_dict(), "vae"))
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).state_dict()
    # transformers >= 5.6 dropped the text_model. level; SD's files have it
    state.update(
        {TEXT_PREFIX + (k if k.startswith(HF_TEXT) else HF_TEXT + k): v for k, v in text.items()}
    )
    state = {k: v.detach().to(cast).contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path)


def file_info(path: str) -> dict[str, Any]:
    """Size, tensor count, parameter count and dtype of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    numel = 0
    for t in header.values():
        count = 1
        for d in t["shape"]:
            count *= d
        numel += count
    dtypes = {SAFETENSORS_DTYPES.get(t["dtype"], t["dtype"]) for t in header.values()}
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "tensors": len(header),
        "numel": numel,
        "dtype": "/".join(sorted(dtypes)),
    }


def evict(path: str) -> None:
    """Drop this file's pages from the page cache (no root needed; other files untouched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: str) -> int | None:
    """The file's bytes in the page cache (``fincore``), or None where it cannot be told."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


# -- diffusers' local config folder -----------------------------------------------------------------
def write_diffusers_config(folder: str) -> None:
    """A diffusers SD 1.5 pipeline folder without weights (configs and tokenizer), offline."""
    import diffusers
    import torch
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig

    from sd_lightning.models import AutoencoderKL, UNetModel
    from sd_lightning.weights.configs import (
        LATENT_SCALE,
        unet_diffusers_config,
        vae_diffusers_config,
    )
    from sd_lightning.weights.schedule import SD_SCHEDULER

    unet_cfg, vae_cfg = (OmegaConf.to_container(c, resolve=True) for c in sd15_configs())
    for c in (unet_cfg, vae_cfg):
        c.pop("_target_")
    with torch.device("meta"):  # the configs as the networks complete them, nothing allocated
        unet, vae = UNetModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    parts = {
        "unet": {"_class_name": "UNet2DConditionModel", **unet_diffusers_config(unet.config, 64)},
        "vae": {
            "_class_name": "AutoencoderKL",
            **vae_diffusers_config(vae.config),
            "scaling_factor": LATENT_SCALE,
        },
    }
    for name, config in parts.items():
        _write_json(os.path.join(folder, name, "config.json"), config)
    CLIPTextConfig(**CLIP_L).save_pretrained(os.path.join(folder, "text_encoder"))
    diffusers.DDIMScheduler(**SD_SCHEDULER).save_config(os.path.join(folder, "scheduler"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    _write_json(
        os.path.join(folder, "model_index.json"),
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def write_clip_tokenizer(folder: str) -> None:
    """CLIP's tokenizer files (``vocab.json``, ``merges.txt``) from the BPE table open_clip ships,
    built as OpenAI's CLIP builds its vocabulary (49408 tokens)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    _write_json(os.path.join(folder, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    eot = "<|endoftext|>"
    _write_json(
        os.path.join(folder, "tokenizer_config.json"),
        {
            "model_max_length": 77,
            "bos_token": "<|startoftext|>",
            "eos_token": eot,
            "unk_token": eot,
            "pad_token": eot,
        },
    )


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# -- the measured calls (each set up and run in a fresh process) ------------------------------------
def _setup_sd_system(path: str, tmp: str) -> Callable[[], Any]:
    import open_clip  # noqa: F401 - imported by the loader: not timed
    import safetensors.torch  # noqa: F401

    import sd_lightning.models  # noqa: F401
    import sd_lightning.systems.ldm  # noqa: F401
    import sd_lightning.weights.text  # noqa: F401
    from sd_lightning.weights.schedule import load_sd_system

    return lambda: load_sd_system(path)


def _setup_networks(path: str, tmp: str) -> Callable[[], Any]:
    """The three networks load_sd_system builds, random-initialised, no file read."""
    import open_clip
    from omegaconf import OmegaConf

    from sd_lightning.models import AutoencoderKL, UNetModel

    unet_cfg, vae_cfg = (OmegaConf.to_container(c, resolve=True) for c in sd15_configs())
    for c in (unet_cfg, vae_cfg):
        c.pop("_target_")
    text_cfg = {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 768,
        "heads": 12,
        "layers": 12,
        "mlp_ratio": 4.0,
        "output_dim": None,
    }

    def build():
        tower = open_clip.transformer.TextTransformer(
            **text_cfg, act_layer=open_clip.transformer.QuickGELU
        )
        return UNetModel(**unet_cfg), AutoencoderKL(**vae_cfg), tower

    return build


def _setup_unet(path: str, tmp: str) -> Callable[[], Any]:
    from omegaconf import OmegaConf

    from sd_lightning.models import UNetModel

    config = OmegaConf.to_container(sd15_configs()[0])
    config.pop("_target_")
    return lambda: UNetModel(**config)


def _setup_load_file(path: str, tmp: str) -> Callable[[], Any]:
    from safetensors.torch import load_file

    return lambda: load_file(path)


def _setup_load_file_touch(path: str, tmp: str) -> Callable[[], Any]:
    import torch
    from safetensors.torch import load_file

    def read():
        state = load_file(path)
        for t in state.values():  # one byte of every 4 KiB page
            int(t.reshape(-1).view(torch.uint8)[::4096].sum())
        return state

    return read


def _setup_load_file_pread(path: str, tmp: str) -> Callable[[], Any]:
    from safetensors.torch import load_file

    return lambda: load_file(path, backend="pread")


def _setup_diffusers(path: str, tmp: str) -> Callable[[], Any]:
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    write_diffusers_config(tmp)
    return lambda: diffusers.StableDiffusionPipeline.from_single_file(
        path, config=tmp, local_files_only=True
    )


CASES: dict[str, tuple[str, Callable[[str, str], Callable[[], Any]]]] = {
    "sd_system": ("ours: `load_sd_system(path)` (U-Net + VAE + text encoder)", _setup_sd_system),
    "load_file_pread": (
        '`safetensors.torch.load_file(path, backend="pread")`: the raw read into memory',
        _setup_load_file_pread,
    ),
    "load_file_touch": (
        "`load_file(path)` + one byte of every page: the raw read through the map",
        _setup_load_file_touch,
    ),
    "load_file": ("`load_file(path)` as is (mmap views, nothing read yet)", _setup_load_file),
    "networks": ("our three networks built alone (random init, no file)", _setup_networks),
    "unet": ("`UNetModel(**sd15)` built alone (random init, no file)", _setup_unet),
    "diffusers": (
        "diffusers `StableDiffusionPipeline.from_single_file(path, config=<local folder>)`",
        _setup_diffusers,
    ),
}
COLD = ("sd_system", "load_file_pread")


def status_kib() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """The peaks of RssAnon and RssFile, read every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = status_kib()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], now[k])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure(case: str, path: str) -> dict[str, Any]:
    """One timed call of ``case`` in this (fresh) process, with its memory."""
    with tempfile.TemporaryDirectory(prefix="sd_load_case_") as tmp:
        call = CASES[case][1](path, tmp)
        gc.collect()
        base = status_kib()
        with PeakSampler() as sampler:
            start = time.perf_counter()
            out = call()
            seconds = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        end = status_kib()
        gc.collect()
        end_gc = status_kib()
        del out
    kib = 1024 / GIB
    return {
        "seconds": seconds,
        "base_gib": base["VmRSS"] * kib,
        "peak_gib": peak_kib * kib,
        "over_gib": (peak_kib - base["VmRSS"]) * kib,
        "anon_gib": (sampler.peak["RssAnon"] - base["RssAnon"]) * kib,
        "file_gib": (sampler.peak["RssFile"] - base["RssFile"]) * kib,
        "held_gib": (end["VmRSS"] - base["VmRSS"]) * kib,
        "held_gc_gib": (end_gc["VmRSS"] - base["VmRSS"]) * kib,
    }


# -- the parent: build, run the cases in subprocesses, write the table ------------------------------
def child(args: list[str], timeout: float = 900) -> dict[str, Any]:
    """This script with ``args`` in a fresh process; its result line, or the error."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def measure_file(path: str, cases: list[str], reps: int, cold: bool) -> dict[str, Any]:
    """Every case ``reps`` times, interleaved, on a warm page cache; then the cold ones."""
    child(["--child", "load_file_touch", path])  # warm the page cache (untimed)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(reps):
        for case in cases:
            runs[case].append(child(["--child", case, path]))
            print(f"  {case}: {_brief(runs[case][-1])}", flush=True)
    evicted: int | None = None
    for case in [c for c in COLD if c in cases] if cold else []:
        runs[case + ":cold"] = []
        for _ in range(reps):
            evict(path)
            left = resident_bytes(path)
            evicted = left if evicted is None or left is None else max(evicted, left)
            runs[case + ":cold"].append(child(["--child", case, path]))
            print(f"  {case} (cold): {_brief(runs[case + ':cold'][-1])}", flush=True)
    return {"file": file_info(path), "runs": runs, "resident_after_evict": evicted}


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return "failed: " + r["error"]
    return f"{r['seconds']:.2f} s, peak +{r['over_gib']:.2f} GiB"


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "n": 0}
    return {"n": len(ok), **{k: statistics.median(r[k] for r in ok) for k in ok[0]}}


PACKAGES = ("torch", "safetensors", "diffusers", "transformers", "lightning", "accelerate")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    with open("/proc/meminfo") as f:
        mem_kib = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
    import torch  # its own version string (with the CUDA build), as the other benchmarks give it

    versions = {**{p: _version(p) for p in PACKAGES}, "torch": torch.__version__}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": mem_kib / 2**20,
        "python": platform.python_version(),
        "kernel": platform.release(),
        **versions,
    }


COLUMNS = [  # (header, summary key, format)
    ("RSS after imports (GiB)", "base_gib", "{:.2f}"),
    ("peak RSS over that (GiB)", "over_gib", "{:.2f}"),
    ("peak over / file size", "over_ratio", "{:.2f}x"),
    ("of which anonymous (GiB)", "anon_gib", "{:.2f}"),
    ("of which file-mapped (GiB)", "file_gib", "{:.2f}"),
    ("held at return (GiB)", "held_gib", "{:.2f}"),
    ("held after gc.collect() (GiB)", "held_gc_gib", "{:.2f}"),
]


def table(result: dict[str, Any], reps: int) -> str:
    size = result["file"]["bytes"] / GIB
    header = ["what", f"time (s, median of {reps})", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, runs in result["runs"].items():
        case, _, cold = key.partition(":")
        label = CASES[case][0] + (", **cold** page cache" if cold else "")
        s = summary(runs)
        if "error" in s:
            lines.append(f"| {label} | failed: {s['error']} |" + " |" * (len(header) - 2))
            continue
        s["over_ratio"] = s["over_gib"] / size
        cells = [f"{s['seconds']:.2f}", *(fmt.format(s[k]) for _, k, fmt in COLUMNS)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def file_line(info: dict[str, Any]) -> str:
    return (
        f"File: {info['dtype']}, {info['bytes'] / 1e9:.2f} GB ({info['bytes'] / GIB:.2f} GiB), "
        f"{info['tensors']} tensors, {info['numel'] / 1e6:.1f} M parameters "
        f"({info['numel'] * 4 / GIB:.2f} GiB as float32)."
    )


def reading(result: dict[str, Any]) -> str:
    """What the figures say, with this run's numbers (the why is in the notes)."""
    info, s = result["file"], {k: summary(v) for k, v in result["runs"].items()}
    ours = s.get("sd_system", {})
    if "seconds" not in ours:
        return ""
    size, params = info["bytes"] / GIB, info["numel"] * 4 / GIB
    text = [
        f"`load_sd_system` took {ours['seconds']:.1f} s on a warm page cache, and its RSS rose "
        f"{ours['over_gib']:.2f} GiB at the peak, {ours['over_gib'] / size:.2f}x the file: "
        f"{ours['anon_gib']:.2f} GiB of anonymous memory ({ours['anon_gib'] / params:.2f}x the "
        f"networks' {params:.2f} GiB of float32 parameters: one copy of the weights) and "
        f"{ours['file_gib']:.2f} GiB of the file's pages mapped by safetensors (page cache, "
        "counted in RSS while the tensors read from the map are referenced)."
    ]
    if ours["held_gib"] > ours["held_gc_gib"] + 0.25:
        text.append(
            f"At return it still held {ours['held_gib']:.2f} GiB, "
            f"{ours['held_gib'] - ours['held_gc_gib']:.2f} GiB of it the mapped file, released "
            "only by the next `gc.collect()` (see the notes)."
        )
    nets, raw = s.get("networks", {}), s.get("load_file_pread", {})
    if "seconds" in nets and "seconds" in raw:
        text.append(
            f"Building the three networks with random initialisation takes "
            f"{nets['seconds']:.1f} s alone, which our loader skips (it builds on the meta "
            f"device); reading the whole file into memory takes {raw['seconds']:.1f} s."
        )
    return " ".join(text)


def notes(results: list[dict[str, Any]], m: dict[str, Any]) -> list[str]:
    """Where the memory goes, and how the reference rows were made."""
    ours = [summary(r["runs"].get("sd_system", [{"error": ""}])) for r in results]
    lines = [
        "## Notes",
        "",
        "- Where the peak comes from: `read_sd_unet` and `read_sd_vae` "
        "(`sd_lightning/weights/read.py`, `_tensors` -> `sd_lightning/files.py` `lazy_tensors`) "
        f"return views of safetensors' private memory map of the file (safetensors "
        f"{m['safetensors']}'s `get_tensor` copies nothing: the `load_file(path)` row reads "
        "nothing). `sd_lightning.weights.read.build` makes each network on the meta device, "
        "gives it uninitialised memory (`to_empty`: no random initialisation that the weights "
        "would replace) and copies the views in with `load_state_dict`; `load_sd_system` then "
        "drops the views. The text encoder is read the same way inside `OpenCLIPTextEncoder`. "
        "So at the peak the process holds the networks' parameters (anonymous memory, one "
        "float32 copy) and the pages of the file it read (file-mapped). Those pages are the "
        "page cache's, shared, and the kernel may drop them under pressure: not a second "
        'private copy (the same bytes read with `backend="pread"` are anonymous memory '
        "instead). The networks are float32 whatever the file holds, so a float16 file costs "
        "its size mapped plus twice its size in parameters.",
    ]
    if any("held_gib" in s and s["held_gib"] > s["held_gc_gib"] + 0.25 for s in ours):
        lines.append(
            "- Held at return: mapped tensors outlive `load_sd_system` until "
            "the cyclic garbage collector runs. Lightning's "
            "`HyperparametersMixin.save_hyperparameters` "
            f"(`lightning/pytorch/core/mixins/hparams_mixin.py` line 128, lightning "
            f"{m['lightning']}) keeps `inspect.currentframe()` in a local of that same frame, a "
            "reference cycle; the frame's `f_back` chain (`LatentDiffusionSystem.__init__`, "
            "`sd_lightning/systems/ldm.py`, then `load_sd_system`) keeps those frames and their "
            "locals alive after they return."
        )
    lines.append(
        "- diffusers needs a diffusers-format config folder for `from_single_file`; the "
        "measured process writes one offline before the timing: the U-Net and VAE configs "
        "from `conf/unet/sd15.yaml` and `conf/vae/sd.yaml` (`sd_lightning.weights.configs`), "
        "transformers' `CLIPTextConfig`, SD's DDIM scheduler settings, and CLIP's tokenizer "
        "files built from the BPE table open_clip ships. "
        + (
            "accelerate is not installed, so diffusers builds its networks with random "
            "initialisation and then calls `load_state_dict`, as ours does."
            if not m.get("accelerate")
            else f"accelerate {m['accelerate']} is installed (diffusers builds on the meta device)."
        )
    )
    return lines


def markdown(
    results: list[dict[str, Any]], reps: int, m: dict[str, Any], command: str, elapsed: float
) -> str:
    parts = [
        "# Loading a Stable Diffusion 1.5 single file: time and peak memory",
        "",
        "How long our loader (`sd_lightning.weights.schedule.load_sd_system`) takes to turn a "
        "whole SD 1.5 single file (U-Net, VAE and CLIP ViT-L/14 text encoder, random weights, "
        "original layout as in `v1-5-pruned-emaonly.safetensors`) into our system, and how much "
        "memory it needs on the way, beside the floor (safetensors reading the file), the cost "
        "of building the networks alone, and diffusers' `from_single_file`. Each figure is from "
        "a fresh process (imports and preparation untimed); memory is the process's RSS after "
        "the imports, its peak (`ru_maxrss`), and the peaks of its anonymous and file-mapped "
        "parts (`/proc/self/status`, sampled every 10 ms). The page cache was warm (one untimed "
        "read of the file first) except in the rows marked cold, which evicted the file's pages "
        "before each run (`posix_fadvise(POSIX_FADV_DONTNEED)` on that file alone: "
        "`/proc/sys/vm/drop_caches` is not writable here).",
        "",
        f"`{command}` on {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, no GPU; "
        f"torch {m['torch']}, safetensors {m['safetensors']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}, Python {m['python']}, Linux {m['kernel']}. "
        f"The whole script (building the files included) ran {elapsed / 60:.1f} min; the load "
        f"average (1 min) was {m['load']:.2f} when it started (other work shares the machine).",
    ]
    for r in results:
        parts += [
            "",
            f"## {r['file']['dtype']} file",
            "",
            file_line(r["file"]),
            "",
            table(r, reps),
            "",
        ]
        if r.get("resident_after_evict") is not None:
            parts.append(
                f"Cold rows: {r['resident_after_evict']} bytes of the file were in the "
                "page cache after each eviction (`fincore`)."
            )
            parts.append("")
        if reading(r):
            parts.append(reading(r))
    parts += ["", *notes(results, m)]
    return "\n".join(parts).rstrip() + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "fp16"],
        help="build and measure a file of each (default fp32)",
    )
    p.add_argument("--file", action="append", help="measure this existing file (kept); repeatable")
    p.add_argument("--build-only", metavar="PATH", help="build the file at PATH (first --dtype)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
    p.add_argument("--no-cold", action="store_true", help="skip the cold page-cache rows")
    p.add_argument("--tmp", default=None, help="where to build the temporary files")
    p.add_argument("--doc", default=DOC, help="markdown output ('' for none)")
    p.add_argument("--child", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _files(args: argparse.Namespace, tmp: str) -> list[tuple[str, str | None]]:
    """(path, dtype to build it in) for each file to measure; None: an existing file, kept."""
    if args.file:
        return [(os.path.abspath(f), None) for f in args.file]
    return [(os.path.join(tmp, f"sd15-random-{d}.safetensors"), d) for d in args.dtype]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        print(MARK + json.dumps(measure(*args.child)), flush=True)
        return
    if args.build_only:
        build_file(args.build_only, args.dtype[0])
        print(MARK + json.dumps(file_info(args.build_only)), flush=True)
        return
    start, load = time.perf_counter(), os.getloadavg()[0]
    cases = [c for c in args.cases.split(",") if c]
    results = []
    with tempfile.TemporaryDirectory(prefix="sd_load_", dir=args.tmp) as tmp:
        for path, dtype in _files(args, tmp):
            if dtype:  # built here, in its own process, deleted after
                print(f"building {path}", flush=True)
                out = child(["--build-only", path, "--dtype", dtype])
                if "error" in out:
                    raise SystemExit(f"building {path} failed: {out['error']}")
            print(f"measuring {path} ({os.path.getsize(path) / 1e9:.2f} GB)", flush=True)
            results.append(measure_file(path, cases, args.reps, not args.no_cold))
            if dtype:
                os.remove(path)
    command = shlex.join(
        [".venv/bin/python", "benchmarks/sd_load.py", *(argv if argv is not None else sys.argv[1:])]
    )
    m = {**machine(), "load": load}
    text = markdown(results, args.reps, m, command, time.perf_counter() - start)
    print(text)
    if args.doc:
        with open(args.doc, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
