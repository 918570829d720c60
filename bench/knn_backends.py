"""Exact k-nearest neighbours: the torch backend against faiss, side by side in one run.

    python bench/knn_backends.py                           # N = 20000 100000, d = 512, k = 21
    python bench/knn_backends.py --sizes 2000 --dim 64     # a quick look
    python bench/knn_backends.py --device cuda             # torch on the GPU, faiss on the CPU

`nearest_neighbours` (the search behind query expansion, DBA and sparse re-ranking; k = 21 is
re-ranking's k1 + 1 at k1 = 20) is timed with each backend, each call in a fresh Python process
so its peak resident memory (VmHWM) is its own; "base" is the process's resident memory just
before the call. Both backends must return the same neighbour lists and distances bit for bit:
the table says whether they did (a digest of the arrays). The ratio is faiss's time over
torch's; "auto" (`resolve_knn_backend` in `retrieval/neighbours.py`) takes the faster one on each
device type.
Embeddings are random unit vectors (seeded). Timings depend on what else the machine runs: the
load average is printed with them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from rerank_speed import peak_rss_bytes, random_unit, rss_bytes  # noqa: E402

from jaguar_reid.retrieval.neighbours import nearest_neighbours  # noqa: E402

BACKENDS = ("torch", "faiss")


def child(n: int, dim: int, k: int, backend: str, device: str) -> dict:
    emb = random_unit(n, dim, seed=0)
    base = rss_bytes()
    start = time.perf_counter()
    idx, dist = nearest_neighbours(emb, k, backend=backend, device=device)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(idx.tobytes() + dist.tobytes()).hexdigest()[:12]
    return {"seconds": seconds, "peak": peak_rss_bytes(), "base": base, "digest": digest}


def run_child(n: int, args: argparse.Namespace, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), backend, "--dim", str(args.dim),
           "--k", str(args.k), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("N", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.dim, args.k, args.child[1],
                               args.device)))
        return
    print(f"k = {args.k}, d = {args.dim}, torch on {args.device}, faiss on the CPU; "
          f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}\n")
    print("| N | torch s | faiss s | faiss / torch | torch peak GiB (base) | "
          "faiss peak GiB (base) | same result |")
    print("|---|---|---|---|---|---|---|")
    gib = 2.0 ** 30
    for n in args.sizes:
        got = {b: run_child(n, args, b) for b in BACKENDS}
        t, f = got["torch"], got["faiss"]
        print(f"| {n} | {t['seconds']:.2f} | {f['seconds']:.2f} | "
              f"{f['seconds'] / t['seconds']:.2f} | {t['peak'] / gib:.2f} "
              f"({t['base'] / gib:.2f}) | {f['peak'] / gib:.2f} ({f['base'] / gib:.2f}) | "
              f"{'yes' if t['digest'] == f['digest'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
