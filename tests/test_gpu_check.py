"""bench/gpu_check.sh: the CPU smoke run of the GPU check (so the script cannot rot while no
GPU is lent), and its report logic on rows shaped like a GPU's (which the CPU cannot make)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

SMOKE_BACKBONE, SMOKE_SIZE, PATCH = "eva02_tiny_patch14_224", 56, 14


def bench_module(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def gpu_check():
    return bench_module("gpu_check")


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """{### title: rows as {column: cell}} of every Markdown table in the report."""
    out: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            continue
        if not line.startswith("|") or title is None:
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
            out[title] = []
        elif not set(line) <= set("|-"):
            out[title].append(dict(zip(header, cells, strict=True)))
    return out


def section(found: dict, prefix: str) -> list[dict[str, str]]:
    titles = [t for t in found if t.startswith(prefix)]
    assert len(titles) == 1, (prefix, list(found))
    return found[titles[0]]


@pytest.mark.slow
def test_smoke_run_reports_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    start = time.perf_counter()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert proc.stdout == report  # stdout carries the report and nothing else
    assert (tmp_path / "gpu_check.json").is_file()
    assert "CPU smoke" in report and wall < 600
    found = tables(report)

    train = {row["config"]: row for row in section(found, "Training")}
    assert set(train) == {"recipe, A100/H100 path", "recipe, T4 path (GradScaler)",
                          "no checkpointing", "recipe + ranking losses",
                          "largest batch, checkpointing on",
                          "largest batch, checkpointing off", "torch.compile"}
    for row in section(found, "Training"):
        assert float(row["images/s"]) > 0, row
        assert float(row["peak memory GiB"]) > 0, row  # the memory column is filled
        assert row["MFU"] == "n/a"  # no peak is known for a CPU
    assert train["largest batch, checkpointing on"]["batch"] == "8"  # the smoke's cap
    assert train["torch.compile"]["compile"] == "eager"

    infer = {row["what"]: row for row in section(found, "Embedding")}
    assert set(infer) == {"embedding, flip TTA (2 views)", "re-rank, dense", "re-rank, sparse"}
    for row in infer.values():
        assert float(row["seconds"]) > 0, row
    assert float(infer["embedding, flip TTA (2 views)"]["rate"].split()[0]) > 0

    estimates = {row["what"]: row for row in section(found, "Estimates")}
    assert any(k.startswith("5 folds x 20 epochs on this CPU") for k in estimates)
    assert any("T4" in k and "fits" in v["estimate"] for k, v in estimates.items())
    assert any(k == "5 folds x 20 epochs on a T4" for k in estimates)

    checks = {row["check"]: row["result"] for row in section(found, "Functional")}
    for name in ("demo data", "tune", "submit.py"):
        assert checks[name] == "pass", checks
    assert [r for k, r in checks.items() if k.startswith("train.sh: folds")] == ["pass"]
    assert checks["DDP: train.sh gpus=2, fold 0, 1 epoch"] == "skipped"
    assert "### Assumptions" in report

    # FLOPs per image against an independent estimate: a ViT does about 2 x parameters x
    # tokens forward, three times that with the backward.
    import timm

    backbone = timm.create_model(SMOKE_BACKBONE, img_size=SMOKE_SIZE, num_classes=0)
    params = sum(p.numel() for p in backbone.parameters())
    tokens = (SMOKE_SIZE // PATCH) ** 2 + 1
    measured = float(re.search(r"([\d.]+) GFLOP forward \+ backward", report).group(1)) * 1e9
    assert 0.5 < measured / (6 * params * tokens) < 2.0
    info = next(r for r in json.loads((tmp_path / "gpu_check.json").read_text())
                if r["table"] == "info")
    assert 0.5 < info["flops_forward"] / (2 * params * tokens) < 2.0


def gpu_rows(peak_gib: float) -> list[dict]:
    """Rows as an H100 run would leave them (the CPU cannot produce them)."""
    info = {"table": "info", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
            "capability": "9.0", "memory_gib": 79.1, "device_count": 1, "auto_dtype": "bf16",
            "torch": "2.x", "backbone": "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k",
            "img_size": 448, "batch": 4, "grad_accum": 4, "backbone_params": 304e6,
            "params": 305e6, "tokens": 1025, "flops_forward": 620e9, "flops_train": 1860e9}
    common = {"table": "train", "compile": "no", "batch": 4, "checkpointing": True}
    return [
        info,
        {**common, "label": "recipe, A100/H100 path", "requested": "bf16", "dtype": "bf16",
         "images_per_s": 80.0, "tflops": 149.0, "mfu": 0.15, "peak_gib": 7.0},
        {**common, "label": "recipe, T4 path (GradScaler)", "requested": "fp16",
         "dtype": "fp16", "images_per_s": 78.0, "tflops": 145.0, "mfu": 0.147,
         "peak_gib": peak_gib},
        {"table": "train", "label": "torch.compile", "note": "time box exceeded (210 s)"},
        {"table": "infer", "label": "embedding, flip TTA (2 views)", "size": "batch 16",
         "images_per_s": 200.0, "seconds": 1.6, "rate": "200 images/s", "mfu": 0.25},
        {"table": "functional", "label": "demo data", "result": "pass", "seconds": 3.0},
    ]


def test_estimates_and_report_on_gpu_shaped_rows():
    check = gpu_check()
    rows = gpu_rows(peak_gib=9.0)
    estimates, assumptions = check.estimate_rows(rows)
    by_label = {r["label"]: r for r in estimates}
    here = by_label["5 folds x 20 epochs on this GPU"]
    # 5 x 20 x 1516 images at 80/s, plus 5 x 22 x 379 at 400/s: 31.6 + 1.7 minutes.
    assert here["value"] == "33 min"
    assert by_label["recipe (batch 4, fp16, checkpointing) on a 16 GB T4"]["value"] == "fits"
    t4 = by_label["5 folds x 20 epochs on a T4"]
    assert t4["value"].endswith(" h") and "14.7%" in t4["note"]  # the measured MFU, under the cap
    text = check.render(rows + estimates, assumptions, check.GPU, 300.0)
    assert text.startswith("## GPU check (full): NVIDIA H100 80GB HBM3")
    found = tables(text)
    train = section(found, "Training")
    assert train[0]["MFU"] == "15.0%" and train[2]["note"] == "time box exceeded (210 s)"
    assert check.failed(rows) == []
    too_big, _ = check.estimate_rows(gpu_rows(peak_gib=14.0))
    assert any(r.get("value") == "does NOT fit" for r in too_big)


def test_peaks_by_gpu_name():
    import torch

    peak_for_name = bench_module("train_throughput").peak_for_name
    bf16, fp16 = torch.bfloat16, torch.float16
    assert peak_for_name("NVIDIA H100 80GB HBM3", bf16) == 989.0
    assert peak_for_name("NVIDIA H100 PCIe", bf16) == 756.0
    assert peak_for_name("NVIDIA H200", fp16) == 989.0
    assert peak_for_name("NVIDIA A100-SXM4-80GB", bf16) == 312.0
    assert peak_for_name("NVIDIA A10", bf16) == 125.0
    assert peak_for_name("NVIDIA L40S", bf16) == 362.0
    assert peak_for_name("NVIDIA L4", fp16) == 121.0
    assert peak_for_name("Tesla T4", fp16) == 65.0
    assert peak_for_name("Tesla T4", bf16) is None  # emulated, no tensor-core peak
    assert peak_for_name("Tesla P100-PCIE-16GB", fp16) == 18.7
    assert peak_for_name("NVIDIA H100 80GB HBM3", None) is None  # fp32: no autocast
    assert peak_for_name("Some Future GPU", bf16) is None


def test_time_box_kills_the_whole_session(tmp_path):
    check = gpu_check()
    marker = tmp_path / "late"
    # A child of the command outlives the command's own shell unless the session is killed.
    script = f"(sleep 3; touch {marker}) & sleep 30"
    start = time.perf_counter()
    done = check.run_process(["bash", "-c", script], 1.0, tmp_path / "log.txt")
    assert done.timed_out and time.perf_counter() - start < 10
    time.sleep(3.5)
    assert not marker.exists()
    assert "[exit None" in (tmp_path / "log.txt").read_text()


def test_failed_functional_check_exits_non_zero_with_the_report(monkeypatch, capsys, tmp_path):
    check = gpu_check()
    rows = gpu_rows(peak_gib=9.0)[:1] + [
        check.functional("tune", "FAIL", 2.0, "exit 1: boom | with a pipe")]
    monkeypatch.setattr(check, "run_sections", lambda *args: list(rows))
    monkeypatch.setenv("OUT", str(tmp_path))
    assert check.main(["--smoke"]) == 1
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "gpu_check.md").read_text()
    functional = section(tables(printed), "Functional")
    assert functional == [{"check": "tune", "result": "FAIL", "seconds": "2.0",
                           "note": "exit 1: boom \\| with a pipe"}]


def test_largest_batch_search_stops_at_out_of_memory(monkeypatch, capsys):
    """The doubling search on a fake GPU that runs out of memory past batch 16: the row times
    batch 16 and names the batch that did not fit."""
    import torch

    check = gpu_check()
    timing = bench_module("train_throughput").Timing
    tried = []

    def fake_measure(bench, cfg, micro_batches, warmup, compile_backend=None):
        batch = cfg.train.batch_size
        tried.append(batch)
        if batch > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return timing(images_per_s=10.0 * batch, seconds=1.0, peak_bytes=2**30,
                      warmup_s=0.1), torch.bfloat16

    monkeypatch.setattr(check, "measure_training", fake_measure)
    bench = type("Bench", (), {"device": "cpu", "optimizer": torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(1))], lr=0.1)})()
    from jaguar_reid.config import load_config

    settings = check.SMOKE
    cfg = load_config(list(settings.model_args) + ["train.batch_size=4"])
    settings = check.Settings(**{**settings.__dict__, "batch_cap": 256})
    check.largest_batch_row(settings, bench, cfg, "largest", 1e9, time.perf_counter() + 60)
    rows = [json.loads(line[len(check.ROW_PREFIX):]) for line in capsys.readouterr().out
            .splitlines() if line.startswith(check.ROW_PREFIX)]
    row = rows[-1]
    assert tried == [8, 16, 32, 16]  # fits 8 and 16, not 32; then batch 16 is timed
    assert row["batch"] == 16 and row["images_per_s"] == 160.0
    assert row["note"] == "largest of a doubling search: batch 32 out of memory"


def test_a_child_that_dies_leaves_its_rows_and_names_the_part(monkeypatch):
    check = gpu_check()
    prefix = check.ROW_PREFIX
    output = "\n".join([
        prefix + json.dumps({"event": "start", "table": "train", "label": "recipe"}),
        prefix + json.dumps({"table": "train", "label": "recipe", "images_per_s": 5.0}),
        "some log line",
        prefix + json.dumps({"event": "start", "table": "train", "label": "torch.compile"}),
    ])
    monkeypatch.setattr(check, "run_process",
                        lambda *args, **kwargs: check.Finished(None, output, 240.0))
    rows = check.child_rows("model", check.SMOKE, 230.0, None)
    assert rows == [{"table": "train", "label": "recipe", "images_per_s": 5.0},
                    {"table": "train", "label": "torch.compile",
                     "note": "time box exceeded (230 s)"}]
    monkeypatch.setattr(check, "run_process", lambda *args, **kwargs: check.Finished(
        -11, output.rsplit("\n", 1)[0] + "\nSegmentation fault", 3.0))
    died = check.child_rows("model", check.SMOKE, 230.0, None)[-1]
    assert died["label"] == "model section"
    assert died["note"] == "process died (exit -11): Segmentation fault"


def test_loss_cost_bench_times_every_variant_against_arcface(monkeypatch, capsys, tiny_cfg_args):
    """bench/loss_cost.py on the tiny recipe: one row per loss and attention variant, the
    reference at 1.00x."""
    loss_cost = bench_module("loss_cost")
    monkeypatch.setattr(sys, "argv", ["loss_cost.py", *tiny_cfg_args, "train.batch_size=8",
                                      "--steps", "1", "--rounds", "1", "--warmup", "0"])
    loss_cost.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(loss_cost.VARIANTS)
    assert rows[0].endswith("| 1.00x |")
