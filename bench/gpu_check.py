"""GPU check: one short run that measures what the recipe costs on this GPU and runs every CUDA
code path of the pipeline once. Prints one Markdown report (a few small tables under one
heading) to stdout and, when the environment variable OUT is set, writes it to
$OUT/gpu_check.md (with $OUT/gpu_check.json and the commands' logs in $OUT/gpu_check_logs/).

    bash bench/gpu_check.sh            # on a GPU: under 8 minutes on one H100 / H200
    bash bench/gpu_check.sh --smoke    # the same script on the CPU, tiny settings

No dataset or weights are needed: the backbone starts from random initialisation
(`model.allow_random_init=true`), training batches are random tensors, the end-to-end run uses
the synthetic demo data. Sections, each with a time box (a row says when it ran out):

  model   EVA-02 L 448 training through the loop's own step (bench/train_throughput.py:
          StepModule, autocast, the fp16 loss scaler, accumulation, clipping, AdamW) in bf16
          and fp16, with and without gradient checkpointing, with the ranking losses
          (P x K 2 x 2, multi-similarity, recall@k, cross-batch memory, mixup), at batch 4 and
          the largest batch that fits, and under torch.compile; FLOPs per image
          (FlopCounterMode), MFU, peak memory; embedding throughput with flip TTA. In a
          process of its own, so that a hang or a crash there is a row, not the end of the
          check.
  rerank  k-reciprocal re-ranking at N = 20,000 and 100,000 (bench/rerank_speed.py's
          measurements; the path the pipeline's memory guard picks).
  demo    demo data, train.sh (2 folds, 1 epoch), tune, submit.py, then training with
          train.amp_dtype=fp16 and =bf16: every CUDA code path once.
  ddp     a 2-process training (gpus=2), where there are 2 GPUs.

The estimates (5 folds x 20 epochs of the competition here and on a 16 GB T4) are computed
from the measured rows; their assumptions are printed under them. Exit status 1 when a
functional check (demo, DDP) failed, 2 when a full run finds no GPU or one this torch build has
no kernels for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path[:0] = [str(REPO / "src"), str(BENCH)]

ROW_PREFIX = "@gpu_check "  # a child's result lines on stdout; everything else is its log
JAGUAR_TRAIN_IMAGES = 1895  # the competition's train.csv
FOLDS, EPOCHS = 5, 20
# Validation embeds the fold's held-out images before training (epoch 0 of the log), after
# every epoch, and once more for the saved embeddings (training/loop.py).
VAL_PASSES = EPOCHS + 2
T4_NAME = "Tesla T4"
T4_VISIBLE_GIB = 14.7  # what torch reports as total memory of Kaggle's 16 GB T4
CUDA_CONTEXT_GIB = 0.5  # CUDA context and kernels: not counted by max_memory_allocated
ALLOCATOR_SLACK = 1.1  # reserved / allocated: the caching allocator's fragmentation
T4_MFU_CAP = 0.15  # a 70 W T4 throttles; ViT-L training reaches ~10-15% model FLOPs there


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """What a run measures and how long each section may take (seconds)."""

    smoke: bool
    device: str
    model_args: tuple[str, ...]  # config overrides of the measured recipe
    timed_steps: int  # optimiser steps timed per training config
    batch_cap: int  # the doubling search for the largest batch stops here
    embed_batches: int  # timed embedding batches
    rerank: tuple[tuple[int, str], ...]  # (N, path: auto | dense | sparse)
    demo_data_args: tuple[str, ...]
    demo_args: tuple[str, ...]  # key=value for every demo command
    tune_args: tuple[str, ...]
    demo_dtypes: tuple[str, ...]  # extra demo trainings, one per train.amp_dtype
    compile_backend: str | None  # None: train.compile's default (inductor)
    # CPU threads of every process (OMP_NUM_THREADS); None: torch's default. The smoke runs on
    # one: beside other work on 2 cores, two spinning OpenMP threads a process make a step
    # 10-30 times slower.
    threads: int | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    # Within the model section: the share of its time for the eager training configs, and the
    # point by which the embedding must be done; torch.compile gets the rest.
    train_share: float = 0.45
    embed_share: float = 0.55

    @property
    def mode(self) -> str:
        return "CPU smoke" if self.smoke else "full"


RECIPE_ARGS = ("model.allow_random_init=true",)
GPU = Settings(
    smoke=False, device="cuda",
    model_args=RECIPE_ARGS + ("device=cuda",),
    timed_steps=5, batch_cap=256, embed_batches=20,
    rerank=((20_000, "auto"), (100_000, "auto")),
    demo_data_args=("--ids", "12", "--min-images", "6", "--max-images", "16"),
    demo_args=("device=cuda",),
    tune_args=(),
    demo_dtypes=("fp16", "bf16"),
    compile_backend=None,
    budgets={"model": 210, "rerank": 100, "demo": 130, "ddp": 60},
)
SMOKE = Settings(
    smoke=True, device="cpu",
    model_args=RECIPE_ARGS + ("device=cpu", "model.backbone=eva02_tiny_patch14_224",
                              "data.img_size=56", "train.batch_size=2", "train.grad_accum=2",
                              "embed.batch_size=4"),
    timed_steps=1, batch_cap=8, embed_batches=2,
    rerank=((2000, "auto"), (2000, "sparse")),
    demo_data_args=("--ids", "10", "--min-images", "6", "--max-images", "8",
                    "--image-size", "64"),
    # The plain floor (one more embedding pass) and the HTML report cost seconds on 2 cores;
    # the full run keeps them.
    demo_args=("device=cpu", "floor.enabled=false", "report.enabled=false"),
    tune_args=("tune.views=[flip]", "tune.qe_k=[1]", "tune.qe_alpha=[0.0]", "tune.dba=[false]",
               "tune.k1=[5]", "tune.k2=[1]", "tune.lambda=[0.3]", "tune.blend=[0.5]",
               "tune.draws=1"),
    demo_dtypes=(),
    # Inductor compiles C++ for minutes on 2 cores; the eager backend still traces the model.
    compile_backend="eager",
    threads=1,
    budgets={"model": 240, "rerank": 90, "demo": 300, "ddp": 120},
)


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


# --------------------------------------------------------------------------- processes


@dataclass
class Finished:
    returncode: int | None  # None: killed at its time box
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_process(argv: list[str], timeout: float, log: Path | None = None,
                cwd: Path = REPO, threads: int | None = None) -> Finished:
    """Run a command in a session of its own (train.sh with gpus=2 starts torchrun, compile
    starts workers); at the time box, the whole session is killed. stdout and stderr are
    kept together, and written to `log`."""
    paths = [str(REPO / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                   else [])
    # train.sh runs ${PYTHON:-python}: the interpreter (and environment) of this check.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHON": sys.executable}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # Output goes straight to a file, so that what a command printed survives even when the
    # whole check is killed from outside.
    with tempfile.TemporaryDirectory(prefix="gpu_check_log_") as scratch:
        path = log or Path(scratch) / "log.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(path, "w") as handle:
            handle.write(f"$ {' '.join(argv)}\n")
            handle.flush()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):  # it may have ended just now
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            seconds = time.perf_counter() - start
        output = path.read_text(errors="replace").split("\n", 1)[-1]
        with open(path, "a") as handle:
            handle.write(f"\n[exit {code}, {seconds:.1f} s]\n")
    return Finished(code, output, seconds)


# What a passing command's output says worth a note: (pattern, format); last match of each.
NOTE_PATTERNS = (
    (r"^fold \S+: .* on (\S+)$", "on {0}"),
    (r"epoch \d+: loss ([\d.]+).*?([\d.]+) img/s", "last epoch: loss {0}, {1} img/s"),
    (r"^(demo data: .*?) -> ", "{0}"),
    (r"^(chosen: .*)$", "{0}"),
    (r"^wrote \S+ \((\d+) rows", "{0} rows written"),
    (r"local test \(test_labels.csv\) \| ([\d.]+)", "local test mAP {0}"),
)


def pass_note(output: str) -> str:
    found = []
    for pattern, fmt in NOTE_PATTERNS:
        matches = re.findall(pattern, output, flags=re.MULTILINE)
        if matches:
            last = matches[-1]
            found.append(fmt.format(*(last if isinstance(last, tuple) else (last,))))
    return "; ".join(found) or last_line(output, 120)


def last_line(text: str, limit: int = 160) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


class Clock:
    """The run's time: each section gets its budget, or what is left of the total."""

    def __init__(self, total: float) -> None:
        self.start, self.total = time.perf_counter(), total

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def box(self, budget: float) -> float:
        return max(0.0, min(budget, self.total - self.elapsed()))


# --------------------------------------------------------------------------- model section
# Runs in a child process (`--child model`): prints ROW_PREFIX + JSON lines as it goes, so the
# rows finished before a hang or a crash survive it.


_STARTED = time.perf_counter()


def emit(table: str, **fields: Any) -> None:
    # at_s: when the row was done, seconds into the child (in the JSON, for the time boxes).
    at = round(time.perf_counter() - _STARTED, 1)
    print(ROW_PREFIX + json.dumps({"table": table, **fields, "at_s": at}), flush=True)


def announce(table: str, label: str) -> None:
    """The part about to run: if the child dies in it, the parent reports this row."""
    print(ROW_PREFIX + json.dumps({"event": "start", "table": table, "label": label}),
          flush=True)


def model_section(settings: Settings, budget: float) -> None:
    import torch
    import train_throughput as tt

    from jaguar_reid.config import load_config

    t0 = time.perf_counter()
    train_until = t0 + settings.train_share * budget
    embed_until = t0 + settings.embed_share * budget
    base = list(settings.model_args)
    cfg = load_config(base)
    device = settings.device
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    announce("train", "model build and FLOP count")
    bench = tt.build_bench(cfg, device)
    forward, total = tt.flops_per_image(bench.model, cfg, device, bench.n_classes)
    emit("info", **device_info(torch, device), **model_info(bench.model, cfg),
         flops_forward=forward, flops_train=total,
         build_s=round(time.perf_counter() - t0, 1))

    def variant(*extra: str):
        return load_config(base + list(extra))

    batch = cfg.train.batch_size
    for label, dtype, ckpt in (("recipe, A100/H100 path", "bf16", True),
                               ("recipe, T4 path (GradScaler)", "fp16", True),
                               ("no checkpointing", "bf16", False),
                               ("no checkpointing", "fp16", False)):
        extra = (f"train.amp_dtype={dtype}", f"model.grad_checkpointing={str(ckpt).lower()}")
        train_row(settings, bench, variant(*extra), label, total, train_until)
    # The ranking losses at the recipe's batch: P x K = 2 x 2, cross-batch memory, mixup.
    pairs = ("train.amp_dtype=bf16", "model.grad_checkpointing=true", "train.sampler=pk",
             "train.pk_k=2", "loss.multi_similarity=1", "loss.recall_k=1",
             "loss.xbm_size=1024", "train.metrix_alpha=2")
    train_row(settings, bench, variant(*pairs), "recipe + ranking losses", total, train_until)
    for ckpt in (True, False):
        label = f"largest batch, checkpointing {'on' if ckpt else 'off'}"
        extra = ("train.amp_dtype=bf16", f"model.grad_checkpointing={str(ckpt).lower()}")
        largest_batch_row(settings, bench, variant(*extra), label, total, train_until)
    embed_row(settings, bench, cfg, forward, embed_until)
    extra = ("train.amp_dtype=bf16", "model.grad_checkpointing=true", "train.compile=true",
             f"train.batch_size={batch}")
    train_row(settings, bench, variant(*extra), "torch.compile", total, t0 + budget,
              compile_backend=settings.compile_backend)


def device_info(torch, device: str) -> dict:
    import timm

    from jaguar_reid.io_utils import amp_dtype

    info = {"torch": torch.__version__, "timm": timm.__version__, "device": device,
            "cuda": torch.version.cuda, "device_count": torch.cuda.device_count()}
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device_name=torch.cuda.get_device_name(device),
                    capability=f"{major}.{minor}",
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory
                                     / 2**30, 1))
        auto = amp_dtype(device, True, "auto")
        info["auto_dtype"] = "bf16" if auto == torch.bfloat16 else "fp16"
    else:
        info.update(device_name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} "
                                "torch thread(s))", auto_dtype="bf16")
    return info


def model_info(model, cfg) -> dict:
    backbone = model.backbone
    patch = getattr(backbone, "patch_embed", None)
    tokens = None
    if patch is not None and hasattr(patch, "num_patches"):
        tokens = int(patch.num_patches) + int(getattr(backbone, "num_prefix_tokens", 0))
    return {"backbone": cfg.model.backbone, "img_size": cfg.data.img_size,
            "batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "backbone_params": sum(p.numel() for p in backbone.parameters()),
            "params": sum(p.numel() for p in model.parameters()), "tokens": tokens}


def release(torch, bench) -> None:
    """Between configs: no gradients, no cached blocks, so each peak is its own."""
    import gc

    bench.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_fields(tt, bench, cfg, dtype, timing, flops: float) -> dict:
    tflops = flops * timing.images_per_s / 1e12
    peak = tt.peak_tflops(bench.device, dtype)
    return {"requested": cfg.train.amp_dtype, "dtype": tt.dtype_name(dtype),
            "checkpointing": bool(cfg.model.grad_checkpointing),
            "batch": cfg.train.batch_size, "images_per_s": timing.images_per_s,
            "tflops": tflops, "mfu": tflops / peak if peak else None,
            "peak_gib": gib(timing.peak_bytes), "seconds": timing.seconds}


def train_row(settings: Settings, bench, cfg, label: str, flops: float, until: float,
              compile_backend: str | None = None) -> None:
    import torch
    import train_throughput as tt

    compiled = compile_backend or ("inductor" if cfg.train.compile else "no")
    base = {"label": label, "compile": compiled, "requested": cfg.train.amp_dtype,
            "checkpointing": bool(cfg.model.grad_checkpointing), "batch": cfg.train.batch_size}
    if time.perf_counter() > until:
        emit("train", **base, note="skipped: the section's time box is spent")
        return
    announce("train", label)
    accum = cfg.train.grad_accum
    try:
        # One optimiser step untimed: allocator, cuBLAS choices, AdamW state, compilation
        # (reported, not timed).
        timing, dtype = measure_training(bench, cfg, settings.timed_steps * accum, accum,
                                         compile_backend)
        note = (f"compilation and warm-up {timing.warmup_s:.1f} s, not timed"
                if compiled != "no" else "")
        emit("train", **{**base, **train_fields(tt, bench, cfg, dtype, timing, flops)},
             note=note)
    except Exception as exc:  # a row says what failed; the check goes on
        emit("train", **base, note=f"error: {type(exc).__name__}: {str(exc)[:200]}")
    release(torch, bench)


def measure_training(bench, cfg, micro_batches: int, warmup: int,
                     compile_backend: str | None = None):
    """(Timing, autocast dtype) of `cfg`'s step; its batch and graph die with this call."""
    import train_throughput as tt

    step, dtype = tt.make_step(bench, cfg, compile_backend)
    timing = tt.time_step(step, bench.device, cfg.train.batch_size, micro_batches, warmup)
    return timing, dtype


def fits(torch, bench, cfg) -> bool:
    """One micro-batch and an optimiser step at cfg's batch size without running out of
    memory (the AdamW state already exists: earlier rows stepped)."""
    cfg = type(cfg)({**cfg, "train": type(cfg)({**cfg.train, "grad_accum": 1})})
    try:
        measure_training(bench, cfg, 1, 0)
        ok = True
    except torch.cuda.OutOfMemoryError:
        ok = False
    # Outside the except block: the traceback no longer holds the failed step's tensors.
    release(torch, bench)
    return ok


def largest_batch_row(settings: Settings, bench, cfg, label: str, flops: float,
                      until: float) -> None:
    """Doubling from twice the recipe's batch to `batch_cap`, out-of-memory caught, then the
    largest that fitted is timed."""
    import torch
    import train_throughput as tt

    from jaguar_reid.config import load_config

    base_batch = cfg.train.batch_size
    base = {"label": label, "compile": "no", "requested": cfg.train.amp_dtype,
            "checkpointing": bool(cfg.model.grad_checkpointing)}
    if time.perf_counter() > until:
        emit("train", **base, batch=base_batch, note="skipped: the section's time box is spent")
        return
    announce("train", label)
    best, batch, why = base_batch, base_batch * 2, f"cap {settings.batch_cap} reached"
    ckpt = str(bool(cfg.model.grad_checkpointing)).lower()
    args = list(settings.model_args) + [f"train.amp_dtype={cfg.train.amp_dtype}",
                                        f"model.grad_checkpointing={ckpt}"]
    try:
        while batch <= settings.batch_cap:
            if time.perf_counter() > until:
                why = f"time box spent before batch {batch}"
                break
            if not fits(torch, bench, load_config(args + [f"train.batch_size={batch}"])):
                why = f"batch {batch} out of memory"
                break
            best, batch = batch, batch * 2
        big = load_config(args + [f"train.batch_size={best}"])
        release(torch, bench)
        timing, dtype = measure_training(bench, big, big.train.grad_accum, 1)
        emit("train", **{**base, **train_fields(tt, bench, big, dtype, timing, flops)},
             note=f"largest of a doubling search: {why}")
    except Exception as exc:
        emit("train", **base, batch=best, note=f"error: {type(exc).__name__}: {str(exc)[:200]}")
    release(torch, bench)


def embed_row(settings: Settings, bench, cfg, forward_flops: float, until: float) -> None:
    """Test-time embedding as retrieval/embedding.py's embed_views does it, on synthetic batches:
    pinned host batch to the device, each view (orig, flip) under autocast through
    `model.embed`, every embedding normalised and copied back."""
    import torch
    import torch.nn.functional as F
    import train_throughput as tt

    from jaguar_reid.io_utils import amp_dtype
    from jaguar_reid.retrieval.embedding import apply_view

    label = "embedding, flip TTA (2 views)"
    size = f"batch {cfg.embed.batch_size}"
    if time.perf_counter() > until:
        emit("infer", label=label, size=size, note="skipped: the section's time box is spent")
        return
    announce("infer", label)
    model, device = bench.model, bench.device
    views = ("orig", "flip")
    dtype = amp_dtype(device, cfg.train.amp, cfg.train.amp_dtype)
    host = torch.randn(cfg.embed.batch_size, 3, cfg.data.img_size, cfg.data.img_size)
    if device.startswith("cuda"):
        host = host.pin_memory()

    @torch.no_grad()
    def batch() -> None:
        images = host.to(device, non_blocking=True)
        for view in views:
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                embedded = model.embed(apply_view(images, view))
            for emb in embedded.values():
                F.normalize(emb.float(), dim=1).cpu().numpy()

    try:
        # As load_trained_model: inference never checkpoints.
        if hasattr(model.backbone, "set_grad_checkpointing"):
            model.backbone.set_grad_checkpointing(False)
        model.eval()
        timing = tt.time_step(batch, device, cfg.embed.batch_size, settings.embed_batches, 2)
        tflops = forward_flops * len(views) * timing.images_per_s / 1e12
        peak = tt.peak_tflops(device, dtype)
        emit("infer", label=label, size=size, seconds=timing.seconds,
             rate=f"{timing.images_per_s:.3g} images/s", images_per_s=timing.images_per_s,
             tflops=tflops, mfu=tflops / peak if peak else None,
             peak_gib=gib(timing.peak_bytes), dtype=tt.dtype_name(dtype),
             note=(f"autocast {tt.dtype_name(dtype)}" if dtype else "fp32, no autocast")
             + f"; {settings.embed_batches} timed batches, 2 views each")
    except Exception as exc:
        emit("infer", label=label, size=size, note=f"error: {type(exc).__name__}: {exc}")
    model.train()
    release(torch, bench)


def child_rows(name: str, settings: Settings, timeout: float, logs: Path | None) -> list[dict]:
    """Run a section in a child process; its rows, plus one for the part it was in when it
    died or ran out of time."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name,
            "--budget", f"{timeout:.0f}"] + (["--smoke"] if settings.smoke else [])
    # A little grace over the child's own time box: it stops its soft-boxed parts itself.
    done = run_process(argv, timeout + 10, logs / f"{name}.log" if logs else None,
                       threads=settings.threads)
    rows, started = [], None
    for line in done.output.splitlines():
        if not line.startswith(ROW_PREFIX):
            continue
        item = json.loads(line[len(ROW_PREFIX):])
        if item.get("event") == "start":
            started = item
        else:
            rows.append(item)
            if started and item.get("label") == started["label"]:
                started = None
    if started is not None or done.returncode:
        why = (f"time box exceeded ({timeout:.0f} s)" if done.timed_out
               else f"process died (exit {done.returncode}): {last_line(done.output)}")
        table = started["table"] if started else "train"
        label = started["label"] if started else f"{name} section"
        rows.append({"table": table, "label": label, "note": why})
    return rows


# --------------------------------------------------------------------------- re-ranking


def rerank_rows(settings: Settings, clock: Clock, budget: float) -> list[dict]:
    """bench/rerank_speed.py's measurement (a fresh process each) at each size, on the device;
    the path is the one the pipeline's memory guard picks (`auto`) unless forced."""
    import rerank_speed

    end = clock.elapsed() + budget
    rows = []
    for n, path in settings.rerank:
        args = rerank_speed.measure_args(device=settings.device, path=path,
                                         threads=settings.threads or 0)
        kind = rerank_speed.fast_paths(n, args)[0]
        label, size = f"re-rank, {kind}", f"N = {n:,}"
        left = end - clock.elapsed()
        if left < 5:
            rows.append({"table": "infer", "label": label, "size": size,
                         "note": "skipped: the section's time box is spent"})
            continue
        result = rerank_speed.measure(kind, n, args, None, timeout=left)
        if "error" in result:
            rows.append({"table": "infer", "label": label, "size": size,
                         "note": result["error"]})
            continue
        peak = result.get("gpu_peak", result["peak"])
        note = "GPU peak" if "gpu_peak" in result else "peak RSS"
        if "stored_per_row" in result:
            note += f"; {result['stored_per_row']:.0f} pairs stored a row"
        rows.append({"table": "infer", "label": label, "size": size,
                     "seconds": result["seconds"], "peak_gib": gib(peak),
                     "rate": f"{n * (n - 1) / result['seconds'] / 1e6:.3g} M pairs/s",
                     "note": f"d={args.dim}, k1={args.k1}, k2={args.k2}, {note}"})
    return rows


# --------------------------------------------------------------------------- demo, DDP


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", label).strip("_")


def functional(label: str, result: str, seconds: float | None = None, note: str = "") -> dict:
    return {"table": "functional", "label": label, "result": result, "seconds": seconds,
            "note": note}


class Demo:
    """The demo end to end in a temporary folder: nothing lands in the repository's output/,
    input/ or folds/."""

    def __init__(self, settings: Settings, tmp: Path, logs: Path | None) -> None:
        self.settings, self.logs = settings, logs
        self.data, self.out = tmp / "demo", tmp / "output"
        self.common = ["config=configs/demo.yaml", f"data.dir={self.data}",
                       f"output_dir={self.out}", f"folds.file={tmp / 'demo_folds.csv'}",
                       *settings.demo_args]

    def step(self, label: str, argv: list[str], timeout: float) -> tuple[dict, bool]:
        if timeout < 5:
            return functional(label, "FAIL", note="not run: the section's time box is spent"), \
                False
        log = self.logs / f"{slug(label)}.log" if self.logs else None
        done = run_process(argv, timeout, log, threads=self.settings.threads)
        ok = done.returncode == 0
        if done.timed_out:
            note = f"time box exceeded ({timeout:.0f} s)"
        elif not ok:
            note = f"exit {done.returncode}: {last_line(done.output)}"
        else:
            note = pass_note(done.output)
        return functional(label, "pass" if ok else "FAIL", done.seconds, note), ok

    def commands(self) -> list[tuple[str, list[str]]]:
        py, folds = sys.executable, "0,1"
        return [
            ("demo data", [py, "-m", "jaguar_reid.demo_data", "--out", str(self.data),
                           "--if-missing", *self.settings.demo_data_args]),
            (f"train.sh: folds {folds}, 1 epoch, auto dtype",
             ["bash", "train.sh", *self.common, f"fold={folds}", "train.epochs=1"]),
            ("tune", [py, "-m", "jaguar_reid.tune", *self.common, *self.settings.tune_args]),
            ("submit.py", [py, "submit.py", *self.common, f"submit.folds={folds}"]),
        ]

    def dtype_command(self, dtype: str) -> list[str]:
        return ["bash", "train.sh", *self.common, f"exp=demo_{dtype}", "fold=0",
                "train.epochs=1", f"train.amp_dtype={dtype}"]

    def submission_note(self) -> str:
        """The written submission has one row per row of the sample submission."""
        sub, sample = self.out / "demo" / "submission.csv", self.data / "sample_submission.csv"
        if not sub.is_file():
            return f"no {sub.name} written"
        rows = sum(1 for _ in sub.open()) - 1
        want = sum(1 for _ in sample.open()) - 1
        return "" if rows == want else f"{rows} rows, the sample submission has {want}"


def demo_rows(settings: Settings, tmp: Path, logs: Path | None, clock: Clock,
              budget: float) -> list[dict]:
    demo = Demo(settings, tmp, logs)
    end = clock.elapsed() + budget
    rows, ok = [], True
    for label, argv in demo.commands():
        if not ok:
            rows.append(functional(label, "FAIL", note="not run: an earlier step failed"))
            continue
        row, ok = demo.step(label, argv, end - clock.elapsed())
        if ok and label == "submit.py":
            problem = demo.submission_note()
            if problem:
                row.update(result="FAIL", note=problem)
                ok = False
        rows.append(row)
    for dtype in settings.demo_dtypes:
        label = f"train.sh: fold 0, train.amp_dtype={dtype}"
        left = end - clock.elapsed()
        if not ok or left < 20:  # extras: only with time to spare, never a failure
            why = "an earlier step failed" if not ok else "the section's time box is spent"
            rows.append(functional(label, "skipped", note=why))
            continue
        rows.append(demo.step(label, demo.dtype_command(dtype), left)[0])
    if not settings.demo_dtypes:
        rows.append(functional("train.sh: train.amp_dtype=fp16 / bf16", "skipped",
                               note="CPU smoke: autocast is off on the CPU"))
    return rows


def ddp_rows(settings: Settings, tmp: Path, logs: Path | None, device_count: int | None,
             clock: Clock, budget: float) -> list[dict]:
    label = "DDP: train.sh gpus=2, fold 0, 1 epoch"
    if settings.smoke or not device_count or device_count < 2:
        why = ("CPU smoke" if settings.smoke else
               f"{device_count if device_count is not None else 'unknown number of'} GPU(s)")
        return [functional(label, "skipped", note=f"{why}: needs 2 GPUs")]
    demo = Demo(settings, tmp, logs)
    if not (demo.data / "train.csv").is_file():
        return [functional(label, "FAIL", note="not run: no demo data (demo data failed)")]
    argv = ["bash", "train.sh", *demo.common, "exp=demo_ddp", "fold=0", "train.epochs=1",
            "gpus=2"]
    return [demo.step(label, argv, clock.box(budget))[0]]


# --------------------------------------------------------------------------- estimates


def find(rows: Iterable[dict], table: str, **match: Any) -> dict | None:
    for row in rows:
        if row.get("table") == table and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def estimate_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """5 folds x 20 epochs of the competition on this device and on a T4, and whether the
    recipe fits a T4's memory, from the measured rows; and the assumptions behind them."""
    info = find(rows, "info") or {}
    batch = info.get("batch")
    # The recipe as train.sh runs it here: amp_dtype auto, checkpointing, batch 4, eager.
    recipe = find(rows, "train", compile="no", batch=batch, checkpointing=True,
                  requested=info.get("auto_dtype", "bf16"))
    t4_path = find(rows, "train", compile="no", batch=batch, checkpointing=True,
                   requested="fp16")
    embed = find(rows, "infer", label="embedding, flip TTA (2 views)")
    here = "this GPU" if info.get("device", "").startswith("cuda") else "this CPU"
    out = [_time_here(recipe, embed, here)]
    memory = _t4_memory(t4_path, batch, here)
    if memory:
        out.append(memory)
    t4_time = _t4_time(t4_path, info)
    if t4_time:
        out.append(t4_time)
    return out, _assumptions()


def _per_fold() -> tuple[float, float]:
    """Training and validation images of one fold of the competition."""
    return JAGUAR_TRAIN_IMAGES * (FOLDS - 1) / FOLDS, JAGUAR_TRAIN_IMAGES / FOLDS


def _time_here(recipe: dict | None, embed: dict | None, here: str) -> dict:
    train_per_fold, val_per_fold = _per_fold()
    label = f"5 folds x 20 epochs on {here}"
    train_rate = (recipe or {}).get("images_per_s")
    # The embedding row's rate is of test images with two views; validation uses one.
    val_rate = 2 * embed["images_per_s"] if embed and embed.get("images_per_s") else None
    if not (train_rate and val_rate):
        return {"table": "estimate", "label": label,
                "note": "not estimated: the recipe or embedding row is missing"}
    train_s = FOLDS * EPOCHS * train_per_fold / train_rate
    val_s = FOLDS * VAL_PASSES * val_per_fold / val_rate
    return {"table": "estimate", "label": label, "value": duration(train_s + val_s),
            "note": f"training {duration(train_s)} at {train_rate:.3g} images/s "
                    f"(recipe row), validation {duration(val_s)} at {val_rate:.3g} "
                    "images/s (embedding row x 2: one view)"}


def _t4_memory(t4_path: dict | None, batch: int | None, here: str) -> dict | None:
    peak = (t4_path or {}).get("peak_gib")
    if peak is None:
        return None
    need = peak * ALLOCATOR_SLACK + CUDA_CONTEXT_GIB
    verdict = "fits" if need <= T4_VISIBLE_GIB else "does NOT fit"
    measured = "GPU allocated" if here == "this GPU" else "CPU RSS, not comparable"
    return {"table": "estimate",
            "label": f"recipe (batch {batch}, fp16, checkpointing) on a 16 GB T4",
            "value": verdict,
            "note": f"{peak:.2f} GiB peak ({measured}) x {ALLOCATOR_SLACK} + "
                    f"{CUDA_CONTEXT_GIB} GiB = {need:.1f} of {T4_VISIBLE_GIB} GiB"}


def _t4_time(t4_path: dict | None, info: dict) -> dict | None:
    import torch
    import train_throughput as tt

    flops_train, flops_fwd = info.get("flops_train"), info.get("flops_forward")
    t4_peak = tt.peak_for_name(T4_NAME, torch.float16)
    if not (flops_train and flops_fwd and t4_peak):
        return None
    train_per_fold, val_per_fold = _per_fold()
    measured_mfu = (t4_path or {}).get("mfu")
    mfu = min(measured_mfu, T4_MFU_CAP) if measured_mfu else T4_MFU_CAP
    work = FOLDS * (EPOCHS * train_per_fold * flops_train
                    + VAL_PASSES * val_per_fold * flops_fwd)
    seconds = work / (mfu * t4_peak * 1e12)
    source = (f"measured fp16 MFU here {measured_mfu:.1%}, capped at {T4_MFU_CAP:.0%}"
              if measured_mfu else f"no MFU measured here: the cap {T4_MFU_CAP:.0%}")
    return {"table": "estimate", "label": "5 folds x 20 epochs on a T4",
            "value": duration(seconds),
            "note": f"{work / 1e15:.3g} PFLOP at {mfu:.1%} MFU of {t4_peak:.0f} "
                    f"TFLOP/s fp16 ({source})"}


def _assumptions() -> list[str]:
    return [
        f"Competition: {JAGUAR_TRAIN_IMAGES:,} training images, {FOLDS} folds (4/5 train, "
        f"1/5 validation), {EPOCHS} epochs; validation embeds its images {VAL_PASSES} times a "
        "fold (before training, after each epoch, at the end), one view. Data loading, the "
        "preprocessing cache and the floor are not counted.",
        "Dense peak TFLOP/s by GPU name (bf16 / fp16, no sparsity): H100 SXM and H200 989 / "
        "989, H100 NVL 835, H100 PCIe 756, A100 312, L40S 362, A10 125, L4 121, T4 - / 65 "
        "(no native bf16), P100 - / 18.7. MFU = model FLOPs (FlopCounterMode, one forward + "
        "backward, without checkpointing's recomputation) x images/s / peak of the autocast "
        "dtype.",
        f"T4 memory: peak allocated x {ALLOCATOR_SLACK} (allocator slack) + "
        f"{CUDA_CONTEXT_GIB} GiB (CUDA context) against the {T4_VISIBLE_GIB} GiB torch sees on "
        "a 16 GB T4; T4 has no flash attention (memory-efficient attention instead), so its "
        "peak may differ a little.",
        f"T4 time: the FLOPs measured here at min(measured fp16 MFU, {T4_MFU_CAP:.0%}) of its "
        "65 TFLOP/s fp16 peak (70 W, clocks throttle); validation at the same MFU.",
    ]


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- report

Fmt = Callable[[Any], str]


def _num(spec: str) -> Fmt:
    return lambda v: "" if v is None else format(v, spec)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _mfu(row: dict) -> str:
    """n/a where a measurement has no known peak (the CPU); empty where MFU does not apply."""
    return _pct(row["mfu"]) if "mfu" in row else ""


def _yes(v: Any) -> str:
    return "" if v is None else ("on" if v else "off")


def _plain(v: Any) -> str:
    return "" if v is None else str(v)


def _autocast(row: dict) -> str:
    """The autocast dtype that ran, and the one asked for where they differ (the CPU runs
    fp32 whatever train.amp_dtype says)."""
    ran, asked = row.get("dtype"), row.get("requested")
    if ran is None:
        return _plain(asked)
    return ran if asked in (None, ran) else f"{ran} ({asked} asked)"


TABLES: dict[str, tuple[str, list[tuple[str, str, Fmt]]]] = {
    "train": ("Training steps (synthetic batches, the loop's step, AdamW)", [
        ("label", "config", _plain), ("*autocast", "autocast", _autocast),
        ("checkpointing", "grad ckpt", _yes), ("batch", "batch", _plain),
        ("compile", "compile", _plain), ("images_per_s", "images/s", _num(".3g")),
        ("tflops", "TFLOP/s", _num(".3g")), ("*mfu", "MFU", _mfu),
        ("peak_gib", "peak memory GiB", _num(".2f")), ("note", "note", _plain)]),
    "infer": ("Embedding and re-ranking", [
        ("label", "what", _plain), ("size", "size", _plain), ("seconds", "seconds", _num(".2f")),
        ("rate", "rate", _plain), ("*mfu", "MFU", _mfu),
        ("peak_gib", "peak memory GiB", _num(".2f")), ("note", "note", _plain)]),
    "estimate": ("Estimates", [
        ("label", "what", _plain), ("value", "estimate", _plain), ("note", "from", _plain)]),
    "functional": ("Functional checks (exit status 1 when one fails)", [
        ("label", "check", _plain), ("result", "result", _plain),
        ("seconds", "seconds", _num(".1f")), ("note", "note", _plain)]),
}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_lines(rows: list[dict], columns: list[tuple[str, str, Fmt]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        # A key starting with "*" formats the whole row (a cell made of several fields).
        lines.append("| " + " | ".join(
            cell(fmt(row) if key.startswith("*") else fmt(row.get(key)))
            for key, _, fmt in columns) + " |")
    return lines


def header_lines(info: dict, settings: Settings, wall: float) -> list[str]:
    where = info.get("device_name", "device unknown (the model section failed)")
    extra = []
    if info.get("capability"):
        extra.append(f"compute capability {info['capability']}")
    if info.get("memory_gib"):
        extra.append(f"{info['memory_gib']} GiB")
    if info.get("device_count") is not None and settings.device.startswith("cuda"):
        extra.append(f"{info['device_count']} GPU(s)")
    lines = [f"## GPU check ({settings.mode}): {where}" + (f" ({', '.join(extra)})"
                                                             if extra else ""), ""]
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "timm", "cuda") if info.get(k))
    lines.append(f"{time.strftime('%Y-%m-%d')}; {versions}; wall time {wall:.0f} s.")
    if info.get("backbone"):
        fwd, train = info.get("flops_forward"), info.get("flops_train")
        lines.append(
            f"Model: `{info['backbone']}` at {info['img_size']} px, random initialisation, "
            f"{info['backbone_params'] / 1e6:.1f} M backbone parameters, "
            f"{info.get('tokens') or '?'} tokens; recipe batch {info['batch']} x accumulation "
            f"{info['grad_accum']}. FLOPs per image: {fwd / 1e9:.4g} GFLOP forward, "
            f"{train / 1e9:.4g} GFLOP forward + backward (FlopCounterMode, no recomputation).")
    return lines


def render(rows: list[dict], assumptions: list[str], settings: Settings, wall: float) -> str:
    info = find(rows, "info") or {}
    lines = header_lines(info, settings, wall)
    for table, (title, columns) in TABLES.items():
        body = [r for r in rows if r.get("table") == table]
        lines += ["", f"### {title}", "", *table_lines(body, columns)]
    lines += ["", "### Assumptions", "", *(f"- {a}" for a in assumptions)]
    return "\n".join(lines) + "\n"


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("table") == "functional" and r.get("result") == "FAIL"]


# --------------------------------------------------------------------------- main


def progress(message: str) -> None:
    """Progress goes to stderr: stdout carries the report only."""
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def run_sections(settings: Settings, tmp: Path, logs: Path | None, clock: Clock,
                 save: Callable[[list[dict], str], None] = lambda rows, pending: None
                 ) -> list[dict]:
    """Every section's rows; `save(rows, next section)` after each, for a partial report."""
    rows: list[dict] = []
    budgets = settings.budgets
    progress(f"model section (time box {clock.box(budgets['model']):.0f} s)")
    rows += child_rows("model", settings, clock.box(budgets["model"]), logs)
    sections: list[tuple[str, Callable[[], list[dict]]]] = [
        ("rerank", lambda: rerank_rows(settings, clock, clock.box(budgets["rerank"]))),
        ("demo", lambda: demo_rows(settings, tmp, logs, clock, clock.box(budgets["demo"]))),
        ("ddp", lambda: ddp_rows(settings, tmp, logs, (find(rows, "info") or {}).get(
            "device_count"), clock, budgets["ddp"])),
    ]
    for name, section in sections:
        save(rows, name)
        progress(f"{name} section (at {clock.elapsed():.0f} s)")
        try:
            rows += section()
        except Exception as exc:  # the report is still printed
            table = "infer" if name == "rerank" else "functional"
            row = {"table": table, "label": f"{name} section",
                   "note": f"error: {type(exc).__name__}: {exc}"}
            if table == "functional":
                row["result"] = "FAIL"
            rows.append(row)
    return rows


def build_report(rows: list[dict], settings: Settings, wall: float,
                 pending: str | None = None) -> tuple[str, list[dict]]:
    """The Markdown report and every row, estimates included; `pending`: the section still to
    run (a partial report, saved as the check goes)."""
    estimates, assumptions = estimate_rows(rows)
    rows = rows + estimates
    text = render(rows, assumptions, settings, wall)
    if pending:
        text = f"(incomplete: the check was still running; next: the {pending} section)\n\n" \
            + text
    return text, rows


def save_outputs(text: str, rows: list[dict], out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


def gpu_refusal() -> str | None:
    """Why this machine's GPUs cannot run the full check: none, or one this torch build has no
    kernels for (the pipeline's own device check, over every GPU: the DDP section uses two);
    None when they can."""
    import torch

    from jaguar_reid.io_utils import UserInputError, resolve_device

    if not torch.cuda.is_available():
        return "no CUDA device; run `bash bench/gpu_check.sh --smoke` on a CPU"
    try:
        resolve_device("cuda", gpus=torch.cuda.device_count())
    except UserInputError as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="on the CPU with tiny settings (the test runs this)")
    parser.add_argument("--child", choices=["model"], help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else GPU
    if args.child:
        model_section(settings, args.budget)
        return 0
    refusal = None if settings.smoke else gpu_refusal()
    if refusal:
        print(f"gpu_check: {refusal}", file=sys.stderr)
        return 2
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    logs = out / "gpu_check_logs" if out else None
    clock = Clock(sum(settings.budgets.values()))
    def save(rows: list[dict], pending: str) -> None:
        save_outputs(*build_report(rows, settings, clock.elapsed(), pending), out)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = run_sections(settings, Path(tmp), logs, clock, save)
    text, rows = build_report(rows, settings, clock.elapsed())
    print(text, end="")
    save_outputs(text, rows, out)
    bad = failed(rows)
    if bad:
        progress("failed: " + "; ".join(r["label"] for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
