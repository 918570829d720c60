"""k-reciprocal re-ranking: time and peak memory of the fast path against the plain reference,
and the time to write a submission CSV.

    python bench/rerank_speed.py                          # N = 2000 5000 20000, d = 1024
    python bench/rerank_speed.py --sizes 2000 5000        # the reference runs where N <= 2000
    python bench/rerank_speed.py --sizes 100000           # sparse path (dense would be 40 GB)
    python bench/rerank_speed.py --sizes 5000 --path both --ref-max 5000 --threads 1
    python bench/rerank_speed.py --sizes 20000 100000 --device cuda   # on a GPU

Embeddings are random unit vectors (seeded). Every measurement runs in a fresh Python process,
so the peak resident memory it reports (VmHWM of /proc/self/status, the process's high-water
mark, which sees torch's allocations as well as numpy's) is that call's alone; "base" is the
process's resident memory just before the call (interpreter, torch, the embeddings). The fast
path is dense `rerank` where `estimate_rerank_memory` fits the default guard
(`DEFAULT_MAX_DENSE_BYTES`), `rerank_sparse` beyond (`--path` overrides). Where both the
reference and the fast path run, the largest absolute difference of the final distances is
printed (all N^2 pairs; for the sparse path via `rerank_pairs`).

Timings depend on what else the machine runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid.retrieval.rerank import (  # noqa: E402
    DEFAULT_MAX_DENSE_BYTES,
    estimate_rerank_memory,
    rerank,
)
from jaguar_reid.retrieval.rerank_reference import rerank_reference  # noqa: E402
from jaguar_reid.retrieval.rerank_sparse import rerank_pairs, rerank_sparse  # noqa: E402

SUBMISSION_ROWS = 137_270  # rows of the competition's sample_submission.csv


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    emb = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # no /proc (not Linux): ru_maxrss, KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return kib * 1024


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return peak_rss_bytes() if kib is None else kib * 1024


# --------------------------------------------------------------------------- child process


def run_child(args: argparse.Namespace) -> None:
    """One measurement: print a JSON line; save the (N, N) result to --out when asked."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    emb = random_unit(args.n, args.dim, args.seed)
    base = rss_bytes()
    start = time.perf_counter()
    if args.child == "reference":
        result = rerank_reference(emb, args.k1, args.k2, args.lam)
    elif args.child == "dense":
        result = rerank(emb, args.k1, args.k2, args.lam, max_dense_bytes=1 << 62,
                        device=args.device)
    else:
        result = rerank_sparse(emb, args.k1, args.k2, args.lam, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    info = {"seconds": seconds, "peak": peak, "base": base, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda") and args.child != "reference":
        info["gpu_peak"] = torch.cuda.max_memory_allocated()
    if args.child == "sparse":
        info["stored_per_row"] = len(result.indices) / args.n
    if args.out:
        if args.child == "sparse":
            rows, cols = np.divmod(np.arange(args.n * args.n), args.n)
            result = rerank_pairs(emb, rows, cols, result).reshape(args.n, args.n)
        np.save(args.out, result)
    print(json.dumps(info))


def measure(kind: str, n: int, args: argparse.Namespace, out: str | None,
            timeout: float | None = None) -> dict:
    """One measurement in a fresh process; {"error": ...} when it fails or outlives
    `timeout` seconds."""
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n), "--dim", str(args.dim),
           "--seed", str(args.seed), "--k1", str(args.k1), "--k2", str(args.k2),
           "--lam", str(args.lam), "--threads", str(args.threads), "--device", args.device]
    if out:
        cmd += ["--out", out]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"time box exceeded ({timeout:.0f} s)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- CSV writers


def write_pandas(path: Path, row_id: np.ndarray, sim: np.ndarray) -> None:
    import pandas as pd

    pd.DataFrame({"row_id": row_id, "similarity": sim}).to_csv(path, index=False,
                                                               float_format="%.7f")


def write_join(path: Path, row_id: np.ndarray, sim: np.ndarray) -> None:
    """One f-string per row, joined: the same "%.7f" rounding as pandas' float_format."""
    lines = [f"{i},{s:.7f}" for i, s in zip(row_id.tolist(), sim.tolist(), strict=True)]
    path.write_text("row_id,similarity\n" + "\n".join(lines) + "\n")


def write_digits(path: Path, row_id: np.ndarray, sim: np.ndarray) -> None:
    """Digits laid into a byte buffer with array arithmetic, no per-row Python. Rounds
    sim * 1e7 in float64, which can differ from "%.7f" on a value within an ulp of a half."""
    scaled = np.rint(sim * 1e7).astype(np.int64)
    ids = row_id.astype(np.int64)
    id_digits = np.ones(len(ids), dtype=np.int64)
    for power in range(1, 19):
        id_digits += ids >= 10 ** power
    length = id_digits + 11  # id, ",", "d.ddddddd", "\n"
    end = np.cumsum(length)
    start = end - length
    buf = np.empty(int(end[-1]) if len(end) else 0, dtype=np.uint8)
    rest = ids.copy()
    for k in range(int(id_digits.max()) if len(ids) else 0):
        has = k < id_digits
        buf[(start + id_digits - 1 - k)[has]] = 48 + rest[has] % 10
        rest //= 10
    comma = start + id_digits
    buf[comma] = ord(",")
    buf[comma + 1] = 48 + scaled // 10_000_000
    buf[comma + 2] = ord(".")
    frac = scaled % 10_000_000
    for k in range(7):
        buf[comma + 9 - k] = 48 + frac % 10
        frac //= 10
    buf[end - 1] = ord("\n")
    path.write_bytes(b"row_id,similarity\n" + buf.tobytes())


def bench_csv(rows: int) -> None:
    rng = np.random.default_rng(0)
    row_id = np.arange(rows)
    sim = rng.random(rows)
    sim[:3] = [0.0, 1.0, 0.5]
    print(f"\nSubmission CSV, {rows} rows (row_id, similarity), best of 3:")
    with tempfile.TemporaryDirectory() as tmp:
        reference_text = None
        for name, writer in (("pandas to_csv(float_format='%.7f')", write_pandas),
                             ("f-string per row + join", write_join),
                             ("numpy digit arithmetic", write_digits)):
            path = Path(tmp) / "sub.csv"
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                writer(path, row_id, sim)
                best = min(best, time.perf_counter() - start)
            text = path.read_bytes()
            if reference_text is None:
                reference_text = text
            same = "identical to pandas" if text == reference_text else "DIFFERS from pandas"
            print(f"  {name:38s} {best * 1e3:7.1f} ms  ({same})")


# --------------------------------------------------------------------------- main


def measure_args(**values) -> argparse.Namespace:
    """The options `measure` and `fast_paths` read, at this script's defaults unless given
    (bench/gpu_check.py measures through them)."""
    defaults = {"dim": 1024, "seed": 0, "k1": 20, "k2": 6, "lam": 0.3, "threads": 0,
                "device": "cpu", "path": "auto"}
    unknown = set(values) - set(defaults)
    if unknown:
        raise TypeError(f"unknown options: {sorted(unknown)}")
    return argparse.Namespace(**{**defaults, **values})


def fast_paths(n: int, args: argparse.Namespace) -> list[str]:
    if args.path == "both":
        return ["dense", "sparse"]
    if args.path != "auto":
        return [args.path]
    fits = estimate_rerank_memory(n, args.k1, True, k2=args.k2) <= DEFAULT_MAX_DENSE_BYTES
    return ["dense" if fits else "sparse"]


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ref-max", type=int, default=2000,
                        help="run the plain reference where N <= this")
    parser.add_argument("--path", choices=["auto", "dense", "sparse", "both"], default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in each measurement (0: torch's default)")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lam", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="where the fast paths run: cpu | cuda (the reference: CPU)")
    parser.add_argument("--csv-rows", type=int, default=SUBMISSION_ROWS)
    parser.add_argument("--child", choices=["reference", "dense", "sparse"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"k-reciprocal re-ranking, d={args.dim}, k1={args.k1}, k2={args.k2}, "
          f"lambda={args.lam}; {os.cpu_count()} CPUs, load average {load}; "
          f"torch threads: {args.threads or 'default'}")
    print("peak = the process's peak RSS (GiB), base = its RSS before the call\n")
    header = (f"{'N':>7} {'path':>6} {'fast s':>8} {'peak':>6} {'base':>5} {'ref s':>8} "
              f"{'peak':>6} {'speed-up':>9} {'max |diff|':>11}  note")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            with_ref = n <= args.ref_max
            ref = None
            if with_ref:
                ref_file = os.path.join(tmp, f"ref{n}.npy")
                ref = measure("reference", n, args, ref_file)
            for path in fast_paths(n, args):
                fast_file = os.path.join(tmp, f"{path}{n}.npy") if with_ref else None
                fast = measure(path, n, args, fast_file)
                note, diff, ratio = "", "", ""
                if "error" in fast:
                    print(f"{n:>7} {path:>6}  failed: {fast['error']}")
                    continue
                if "stored_per_row" in fast:
                    note = f"{fast['stored_per_row']:.0f} pairs stored a row (upper triangle)"
                if "gpu_peak" in fast:
                    note += f" GPU peak {gib(fast['gpu_peak'])} GiB"
                ref_s = ref_peak = ""
                if ref and "error" not in ref:
                    ref_s, ref_peak = f"{ref['seconds']:.2f}", gib(ref["peak"])
                    ratio = f"{ref['seconds'] / fast['seconds']:.1f}x"
                    a, b = np.load(ref_file), np.load(fast_file)
                    diff = f"{np.abs(a - b).max():.1e}"
                elif ref:
                    note = f"reference failed: {ref['error']}"
                print(f"{n:>7} {path:>6} {fast['seconds']:>8.2f} {gib(fast['peak']):>6} "
                      f"{gib(fast['base']):>5} {ref_s:>8} {ref_peak:>6} {ratio:>9} {diff:>11}"
                      f"  {note}")
    bench_csv(args.csv_rows)


if __name__ == "__main__":
    main()
