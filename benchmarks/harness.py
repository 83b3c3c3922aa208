"""What the GPU benchmarks share: the device and its peak rate, timing, FLOP counting, memory,
model presets, and the JSON each benchmark leaves for ``gpu_suite.py`` to turn into markdown.

Plain functions; each benchmark script is runnable on its own and on the CPU at tiny sizes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peaks from the datasheets (SXM parts), for MFU. H200 has the H100's.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_info(device: torch.device) -> dict[str, Any]:
    """What a table needs to say where its figures come from."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            peak_tflops=peak_tflops(props.name),
        )
    else:
        info.update(name=f"CPU ({platform.processor() or platform.machine()})", peak_tflops=None)
    return info


def peak_tflops(name: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s of a GPU by name (``None`` when unknown: no MFU then)."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``n`` calls, measured after a synchronisation on both
    ends (CUDA events on a GPU, the host clock on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / n
    begin = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - begin) / n


def interleaved(
    steps: dict[str, Callable[[], Any]], n: int, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step of each entry, timed in turn ``rounds`` times (drift and noise hit
    all alike)."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, n, device))
    return {k: statistics.median(v) for k, v in times.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by
    ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(
        v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)
    )


def step_memory(step: Callable[[], Any], resident: int, device: torch.device) -> int | None:
    """Peak bytes of one step for a model that would be alone on the device: ``resident`` (its
    weights and optimizer state) plus what the step allocates above what is there before it."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return resident + torch.cuda.max_memory_allocated(device) - before


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def unet_preset(name: str, **overrides: Any):
    """``conf/unet/<name>.yaml`` as a :class:`UNetModel`, built on the current default device."""
    from omegaconf import OmegaConf

    from sd_lightning.models import UNetModel

    cfg = OmegaConf.to_container(load_preset("unet", name))
    cfg.pop("_target_")
    cfg.update(overrides)
    return UNetModel(**cfg)


def load_preset(group: str, name: str):
    """``conf/<group>/<name>.yaml`` with the presets its ``defaults`` list names merged under it
    (``sd2`` is ``sd15`` plus its own values)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "conf", group, f"{name}.yaml"))
    bases = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*[load_preset(group, b) for b in bases], cfg) if bases else cfg


def vae_preset(name: str, resolution: int):
    from omegaconf import OmegaConf

    from sd_lightning.models import AutoencoderKL

    cfg = load_preset("vae", name)
    cfg.resolution = resolution
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg.pop("_target_")
    return AutoencoderKL(**cfg)


@torch.no_grad()
def nonzero(net: torch.nn.Module, std: float = 0.02) -> None:
    """Small random values in the zero-initialised layers (the output convolutions), so that the
    two implementations' outputs are not both zero when compared."""
    for p in net.parameters():
        if p.ndim > 1 and not p.any():
            p.normal_(0.0, std)


def size_embed_dim(config: dict) -> int:
    """The size-embedding width of an SDXL-shaped U-Net config: SDXL's 256 where the vector
    condition has room for it beside a pooled text vector, else the largest power of two that
    leaves one (``sdxl_tiny``: 128 = 32 + 6 x 16). The U-Net cannot say; the text encoder does."""
    adm, d = config.get("adm_in_channels") or 0, 256
    while d > 1 and adm - 6 * d <= 0:
        d //= 2
    return d


def diffusers_unet(ours, sample_size: int):
    """diffusers' ``UNet2DConditionModel`` with our U-Net's layout and weights (diffusers' own
    single-file converter), on our U-Net's device."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sd_lightning.weights.configs import unet_diffusers_config
    from sd_lightning.weights.layouts import to_original

    config = unet_diffusers_config(ours.config, sample_size, size_embed_dim(ours.config))
    device = next(ours.parameters()).device
    with torch.device(device):
        theirs = diffusers.UNet2DConditionModel(**config)
    state = convert_ldm_unet_checkpoint(to_original(ours.state_dict(), "unet"), config)
    theirs.load_state_dict(state, strict=True)
    return theirs


def diffusers_vae(ours):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sd_lightning.weights.configs import vae_diffusers_config
    from sd_lightning.weights.layouts import to_original

    config = vae_diffusers_config(ours.config)
    device = next(ours.parameters()).device
    with torch.device(device):
        theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict(
        convert_ldm_vae_checkpoint(to_original(ours.state_dict(), "vae"), config)
    )
    return theirs


def write_result(path: str | None, result: dict[str, Any], quiet: bool = False) -> None:
    """The benchmark's figures as JSON (``gpu_suite.py`` reads them), and to stdout."""
    text = json.dumps(result, indent=1, default=str)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if not quiet:
        print(text)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Budget:
    """Seconds left of a run's time budget: parts that would not fit are skipped and named."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds
