"""The U-Net training step (forward, backward, AdamW): ours against diffusers, and the trick ladder.

    python benchmarks/unet_step.py                       # GPU: sd15/sd2 at 256 and 512 px, bf16
    python benchmarks/unet_step.py --device cpu --precision fp32 --threads 1 \\
        --cases tiny:128:4,sd15:256:1 --optimizer sgd --rounds 7 --md docs/benchmarks/unet_step_cpu.md

1. Ours against diffusers' ``UNet2DConditionModel`` built from the same config
   (``weights.configs.unet_diffusers_config``) with the same weights (diffusers' own single-file
   converter; the outputs are compared), the same batch and the same optimizer, in one process,
   timed in turn: ms/step, images/s, TFLOP/s (FLOPs of one image counted by
   ``torch.utils.flop_counter``), MFU against the device's datasheet dense-bf16 peak, and the peak
   memory each would use alone. Ours runs as ``trainer=gpu`` runs it: the ``conf/unet`` and
   ``conf/model/ldm.yaml`` defaults.
2. The ladder (``--ladder unet:px:batch``): one trick after another on our U-Net, each rung timed:
   float32 norms (autocast's default) -> norms in bf16, channels_last, fused AdamW, the SDPA
   backends, activation checkpointing's cost, torch.compile per layer and whole-model, CUDA graphs.
3. The largest batch that fits (``--largest-batch``): predicted from the peak memory at two
   batches (it grows linearly), then one step at that batch.

Writes JSON (``--json``) for ``gpu_suite.py`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ROOT,
    Budget,
    count_flops,
    device_info,
    diffusers_unet,
    free_memory,
    interleaved,
    is_oom,
    md_table,
    nonzero,
    optimizer_bytes,
    size_embed_dim,
    step_memory,
    tensor_bytes,
    time_steps,
    unet_preset,
    write_result,
)

GPU_CASES = "sd15:256:64,sd15:512:32,sd2:256:64,sd2:512:32"


# -- one training step ---------------------------------------------------------------------------
def optimizer_defaults() -> dict[str, Any]:
    """The AdamW settings of ``conf/model/ldm.yaml`` (what a stage-2 run uses)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "conf", "model", "ldm.yaml")).optimizer
    cfg = OmegaConf.to_container(cfg)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def make_optimizer(params, kind: str, **overrides: Any) -> torch.optim.Optimizer:
    if kind == "sgd":  # no state: for two SD-size models on a machine without the memory for it
        return torch.optim.SGD(params, lr=1e-5)
    kwargs = {**optimizer_defaults(), **overrides}
    kwargs["betas"] = tuple(kwargs["betas"])
    from sd_lightning.systems.optim import (
        adamw,  # the run's own factory (AdamW, or 8-bit by config)
    )

    return adamw(params, **kwargs)


class Batch:
    """A fixed random batch of latents, timesteps, text states and targets on the device, and
    for a U-Net with a vector condition (SDXL) a pooled text vector and size ids: ours gets
    them as ``y`` (the conditioner's work), diffusers' as ``added_cond_kwargs``."""

    def __init__(self, b: int, latent: int, config: dict, device: torch.device, seed: int = 0):
        from sd_lightning.conditioning.sizes import size_embedding

        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(b, 4, latent, latent, generator=g).to(device)
        self.t = torch.randint(0, 1000, (b,), generator=g).to(device)
        self.context = torch.randn(b, 77, config["context_dim"], generator=g).to(device)
        self.target = torch.randn(b, 4, latent, latent, generator=g).to(device)
        self.y = self.added = None
        adm = config.get("adm_in_channels")
        if adm:
            dim = size_embed_dim(config)
            pooled = torch.randn(b, adm - 6 * dim, generator=g)
            side = float(latent * 8)
            ids = torch.tensor([[side, side, 0.0, 0.0, side, side]]).expand(b, 6)
            self.y = torch.cat([pooled, size_embedding(ids, dim)], 1).to(device)
            self.added = {"text_embeds": pooled.to(device), "time_ids": ids.to(device)}


def forward_of(net, diffusers: bool):
    """``forward(batch) -> output`` of our U-Net or diffusers'."""
    if diffusers:
        return lambda b: net(
            b.x, b.t, encoder_hidden_states=b.context, added_cond_kwargs=b.added, return_dict=False
        )[0]
    return lambda b: net(b.x, b.t, b.context, b.y)


def make_step(net, opt, batch: Batch, precision: str, device: torch.device, diffusers=False):
    forward = forward_of(net, diffusers)
    amp = precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(batch)
        F.mse_loss(out.float(), batch.target).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def resident_bytes(net, opt) -> int:
    return tensor_bytes(net.parameters()) + (optimizer_bytes(opt) if opt is not None else 0)


@torch.no_grad()
def output_difference(ours, theirs, batch: Batch, precision: str, device: torch.device) -> float:
    """``|ours - diffusers| / |diffusers|`` on the same batch (two samples), in eval mode."""
    amp = precision == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        a = forward_of(ours, False)(batch).float()
        b = forward_of(theirs, True)(batch).float()
    return float((a - b).norm() / b.norm())


# -- 1. ours against diffusers ---------------------------------------------------------------------
def compare(args, device: torch.device, peak: float | None) -> list[dict[str, Any]]:
    cases: dict[str, list[tuple[int, int]]] = {}
    for case in args.cases.split(","):
        name, px, b = case.split(":")
        cases.setdefault(name, []).append((int(px), int(b)))
    rows: list[dict[str, Any]] = []
    for name, sizes in cases.items():
        torch.manual_seed(0)
        with torch.device(device):
            ours = unet_preset(name)
        nonzero(ours)
        theirs = diffusers_unet(ours, sample_size=sizes[0][0] // 8)
        ctx_dim = ours.config  # what a batch needs: the context width, a vector condition
        opts = {
            "ours": make_optimizer(ours.parameters(), args.optimizer),
            "diffusers": make_optimizer(theirs.parameters(), args.optimizer),
        }
        nets = {"ours": ours, "diffusers": theirs}
        diff = output_difference(
            ours.eval(), theirs.eval(), Batch(2, 8, ctx_dim, device), args.precision, device
        )
        ours.train(), theirs.train()
        for px, b in sizes:
            batch = Batch(b, px // 8, ctx_dim, device)
            one = Batch(1, px // 8, ctx_dim, device)
            steps = {
                k: make_step(nets[k], opts[k], batch, args.precision, device, k == "diffusers")
                for k in nets
            }
            flops = {
                k: count_flops(
                    make_step(nets[k], None, one, args.precision, device, k == "diffusers")
                )
                for k in nets
            }
            for k in nets:  # nets[k].zero_grad: count_flops left gradients behind
                nets[k].zero_grad(set_to_none=True)
                for _ in range(args.warmup):
                    steps[k]()
            memory = {
                k: step_memory(steps[k], resident_bytes(nets[k], opts[k]), device) for k in nets
            }
            times = interleaved(steps, args.steps, args.rounds, device)
            for k in nets:
                sec = times[k]
                tflops = flops[k] * b / sec / 1e12
                rows.append(
                    {
                        "unet": name,
                        "px": px,
                        "batch": b,
                        "impl": k,
                        "ms_per_step": sec * 1e3,
                        "images_per_s": b / sec,
                        "gflop_per_image": flops[k] / 1e9,
                        "tflops": tflops,
                        "mfu": tflops / peak if peak else None,
                        "peak_gib": memory[k] / 2**30 if memory[k] else None,
                        "vs_diffusers": times["diffusers"] / sec,
                        "output_rel_diff": diff,
                    }
                )
            print(
                md_table(*compare_table([r for r in rows if r["unet"] == name and r["px"] == px]))
            )
            sys.stdout.flush()
        del ours, theirs, nets, opts, steps
        free_memory(device)
    return rows


def compare_table(rows: list[dict[str, Any]]):
    header = [
        "U-Net", "px", "batch", "implementation", "ms/step", "images/s", "GFLOP/image",
        "TFLOP/s", "MFU", "peak GiB", "speed vs diffusers", "output rel. diff",
    ]  # fmt: skip
    body = [
        [
            r["unet"],
            r["px"],
            r["batch"],
            r["impl"],
            r["ms_per_step"],
            r["images_per_s"],
            r["gflop_per_image"],
            r["tflops"],
            f"{r['mfu']:.1%}" if r["mfu"] is not None else None,
            r["peak_gib"],
            f"{r['vs_diffusers']:.3f}x",
            f"{r['output_rel_diff']:.1e}",
        ]  # fmt: skip
        for r in rows
    ]
    return header, body


# -- 2. the ladder ---------------------------------------------------------------------------------
SDPA = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA[backend])])


def ladder_rungs(device: torch.device) -> list[dict[str, Any]]:
    """Each rung: a label and the settings it runs with. Cumulative through fused AdamW; each
    later rung (compile, an SDPA backend, checkpointing, CUDA graphs) starts from that one."""
    base = {"fp32_norms": True, "channels_last": False, "sdpa": None}
    base["opt"] = {"foreach": True, "fused": False}
    norms = {**base, "fp32_norms": False}
    nhwc = {**norms, "channels_last": True}
    fused = {**nhwc, "opt": {"foreach": False, "fused": True}}
    rungs = [
        ("baseline: autocast (float32 norm outputs), NCHW, foreach AdamW", base),
        ("+ GroupNorm/LayerNorm outputs in bf16 (no float32 round trip)", norms),
        ("+ channels_last", nhwc),
        ("+ fused AdamW", fused),
    ]
    if device.type == "cuda":
        rungs += [(f"+ SDPA backend: {k} only (eager)", {**fused, "sdpa": k}) for k in SDPA]
    rungs.append(
        ("+ activation checkpointing (eager; memory for time)", {**fused, "checkpointing": True})
    )
    rungs.append(("baseline again (the noise between two timings of one version)", base))
    # last: each costs minutes of compilation (SD 1.5 per layer: over 150 s on 16 cores)
    rungs += [
        ("+ torch.compile per layer (model.compile=true)", {**fused, "compile": "layers"}),
        ("+ torch.compile whole model (compile_scope=model)", {**fused, "compile": "model"}),
    ]
    if device.type == "cuda":
        rungs.append(
            (
                "+ whole model, mode=reduce-overhead (CUDA graphs)",
                {**fused, "compile": "model", "mode": "reduce-overhead"},
            )
        )
    return [{"label": label, **settings} for label, settings in rungs]


def ladder(
    args, device: torch.device, peak: float | None, budget: Budget, save=None
) -> list[dict[str, Any]]:
    name, px, b = args.ladder.split(":")
    px, b = int(px), int(b)
    rows: list[dict[str, Any]] = []
    save = save or (lambda rows: None)
    wanted = [w.lower() for w in args.rungs.split(",") if w]
    net = opt = None
    opt_key: tuple | None = None
    flops = None
    for rung in ladder_rungs(device):
        if wanted and not any(w in rung["label"].lower() for w in wanted):
            continue
        compiled = rung.get("compile")
        cost = args.compile_cost if compiled else args.rung_cost
        row: dict[str, Any] = {"rung": rung["label"], "unet": name, "px": px, "batch": b}
        if not budget.allows(cost):
            rows.append({**row, "skipped": f"time budget ({budget.left():.0f} s left)"})
            continue
        began = time.monotonic()
        try:
            if compiled or net is None:  # compiled rungs get a fresh network each
                net = opt = None
                free_memory(device)
                torch._dynamo.reset()
                torch.manual_seed(0)
                with torch.device(device):
                    net = unet_preset(name)
            net.set_fp32_norms(rung["fp32_norms"])
            net.set_channels_last(rung["channels_last"])
            net.gradient_checkpointing = bool(rung.get("checkpointing"))
            if compiled:
                from sd_lightning.models.parallel import compile_unet

                compile_unet(net, compiled, **({"mode": rung["mode"]} if rung.get("mode") else {}))
            key = (rung["channels_last"], *sorted(rung["opt"].items()))
            if opt is None or key != opt_key:  # optimizer state in the weights' layout
                opt = None
                free_memory(device)
                opt, opt_key = make_optimizer(net.parameters(), args.optimizer, **rung["opt"]), key
            ctx = net.config
            step = make_step(net, opt, Batch(b, px // 8, ctx, device), args.precision, device)
            with sdpa_context(rung["sdpa"]):
                if flops is None:
                    one = Batch(1, px // 8, ctx, device)
                    flops = count_flops(make_step(net, None, one, args.precision, device))
                    net.zero_grad(set_to_none=True)
                for _ in range(args.warmup + (2 if compiled else 0)):
                    step()
                memory = step_memory(step, resident_bytes(net, opt), device)
                sec = time_steps(step, args.steps, device)
            tflops = flops * b / sec / 1e12
            row.update(
                ms_per_step=sec * 1e3,
                images_per_s=b / sec,
                tflops=tflops,
                mfu=tflops / peak if peak else None,
                peak_gib=memory / 2**30 if memory else None,
            )
        except Exception as e:  # a rung that fails is reported, and the ladder goes on
            first = str(e).splitlines()[0][:200] if str(e) else ""
            row["error"] = f"{type(e).__name__}: {first}"
            traceback.print_exc()
            net = opt = None
        finally:
            if compiled:
                net = opt = None
            elif net is not None:
                net.gradient_checkpointing = False
        row["wall_s"] = time.monotonic() - began
        rows.append(row)
        save(rows)  # a run cut short keeps the rungs already measured
        print(md_table(*ladder_table(rows[-1:])))
        sys.stdout.flush()
    net = opt = None
    torch._dynamo.reset()
    free_memory(device)
    base = next((r for r in rows if "ms_per_step" in r), None)
    for r in rows:
        if base and "ms_per_step" in r:
            r["vs_baseline"] = base["ms_per_step"] / r["ms_per_step"]
    return rows


def ladder_table(rows: list[dict[str, Any]]):
    header = ["rung", "ms/step", "images/s", "TFLOP/s", "MFU", "peak GiB", "vs baseline", "note"]
    body = []
    for r in rows:
        note = r.get("error") or (f"not run: {r['skipped']}" if r.get("skipped") else "")
        vs = f"{r['vs_baseline']:.3f}x" if r.get("vs_baseline") else None
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else None
        body.append(
            [
                r["rung"],
                r.get("ms_per_step"),
                r.get("images_per_s"),
                r.get("tflops"),
                mfu,
                r.get("peak_gib"),
                vs,
                note,
            ]
        )
    return header, body


# -- 3. the largest batch --------------------------------------------------------------------------
def largest_batch(args, device: torch.device) -> dict[str, Any]:
    """Peak memory grows linearly with the batch: fit it on two batches, predict the largest that
    fits in the device's memory, then run one step at that batch (backing off 10 % on OOM)."""
    name, px, b = args.ladder.split(":")
    px, b = int(px), int(b)
    if device.type != "cuda":
        return {"skipped": "needs a CUDA device"}
    free_memory(device)
    torch.manual_seed(0)
    with torch.device(device):
        net = unet_preset(name)
    opt = make_optimizer(net.parameters(), args.optimizer)
    ctx = net.config
    peaks = {}
    for n in (max(1, b // 4), b):
        step = make_step(net, opt, Batch(n, px // 8, ctx, device), args.precision, device)
        step()
        peaks[n] = peak_allocated(step, device)
    (b1, m1), (b2, m2) = sorted(peaks.items())
    slope = (m2 - m1) / (b2 - b1)
    total = torch.cuda.mem_get_info(device)[1]
    predicted = int((0.97 * total - (m1 - slope * b1)) / slope)
    result: dict[str, Any] = {
        "unet": name,
        "px": px,
        "gib_per_image": slope / 2**30,
        "predicted": predicted,
        "device_gib": total / 2**30,
    }
    n = predicted
    for _ in range(3):
        try:
            step = make_step(net, opt, Batch(n, px // 8, ctx, device), args.precision, device)
            result["verified_peak_gib"] = peak_allocated(step, device) / 2**30
            result["verified"] = n
            break
        except Exception as e:
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            free_memory(device)
            n = int(n * 0.9)
    del net, opt
    free_memory(device)
    return result


def peak_allocated(step, device: torch.device) -> int:
    """The device's peak allocated bytes during one ``step`` (everything resident included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# -- main ------------------------------------------------------------------------------------------
def to_markdown(result: dict[str, Any]) -> str:
    parts = []
    if result.get("compare"):
        parts.append(md_table(*compare_table(result["compare"])))
    if result.get("ladder"):
        parts.append(md_table(*ladder_table(result["ladder"])))
    lb = result.get("largest_batch")
    if lb and "predicted" in lb:
        parts.append(
            f"Largest batch, {lb['unet']} at {lb['px']} px: {lb['gib_per_image']:.2f} GiB per "
            f"image, predicted {lb['predicted']} in {lb['device_gib']:.0f} GiB; one step ran at "
            f"batch {lb.get('verified', 'none')} (peak {lb.get('verified_peak_gib', 0):.1f} GiB)."
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--cases", default=GPU_CASES, help="unet:px:batch,... (comparison with diffusers)"
    )
    p.add_argument(
        "--ladder", default="sd15:512:32", help="unet:px:batch of the ladder ('' for none)"
    )
    p.add_argument("--rungs", default="", help="only the rungs whose label has one of these words")
    p.add_argument("--largest-batch", action="store_true")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the ladder")
    p.add_argument("--rung-cost", type=float, default=15.0, help="seconds an eager rung needs")
    p.add_argument("--compile-cost", type=float, default=240.0, help="seconds a compile rung needs")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None, help="also write the tables (with the command) here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = device_info(device)
    result: dict[str, Any] = {"device": info, "args": vars(args), "errors": []}
    budget = Budget(args.budget)

    def save(rows: list[dict[str, Any]]) -> None:
        write_result(args.json, {**result, "ladder": rows}, quiet=True)

    for part, fn in (
        ("compare", lambda: compare(args, device, info["peak_tflops"]) if args.cases else []),
        (
            "ladder",
            lambda: ladder(args, device, info["peak_tflops"], budget) if args.ladder else [],
        ),
        ("largest_batch", lambda: largest_batch(args, device) if args.largest_batch else None),
    ):
        began = time.monotonic()
        try:
            result[part] = fn()
        except Exception as e:
            traceback.print_exc()
            result["errors"].append(f"{part}: {type(e).__name__}: {e}")
        result[f"{part}_wall_s"] = time.monotonic() - began
        write_result(args.json, result)  # after every part: a timeout keeps what was measured
    md = to_markdown(result)
    print(md)
    if args.md:
        command = "python benchmarks/unet_step.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        with open(args.md, "w") as f:
            f.write(
                f"# U-Net training step: ours against diffusers\n\n`{command}` on {info['name']}, "
                f"{info['cpu_count']} cores, torch {info['torch']}.\n\n{md}\n"
            )
    return result


if __name__ == "__main__":
    main()
