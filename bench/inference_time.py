"""Test-set inference time of trained experiments, measured side by side in one run: what a
submission pays for a fold ensemble against one distilled student.

    python bench/inference_time.py EXP:FOLDS [EXP:FOLDS ...] -- [key=value ...]
    python bench/inference_time.py p_base:0..1 student:full -- \\
        config=configs/dogface_lite0.yaml output_dir=output/meas/pseudo

For each experiment, each fold model of FOLDS is loaded and embeds every test image (views of
`embed.tta`, the batch size of `embed.batch_size`, this machine's device); the table gives
the load and embedding seconds summed over the folds and the ratio to the first experiment.
The images are decoded into the cache first, so decoding is not timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from jaguar_reid import layout  # noqa: E402
from jaguar_reid.config import load_config, parse_fold_spec  # noqa: E402
from jaguar_reid.data.csv_tables import pair_image_names, read_test_csv  # noqa: E402
from jaguar_reid.data.image_cache import prepare_images  # noqa: E402
from jaguar_reid.io_utils import resolve_device  # noqa: E402
from jaguar_reid.retrieval.embedding import embed_views, fold_config  # noqa: E402
from jaguar_reid.text import markdown_table  # noqa: E402
from jaguar_reid.training.model import load_trained_model  # noqa: E402


def time_experiment(cfg, exp: str, folds: list, names: list[str], device: str) -> dict:
    load_s = embed_s = 0.0
    files = layout.data_files(cfg)
    for fold in folds:
        fold_cfg, weights = fold_config(cfg, exp, fold)
        images = prepare_images(fold_cfg, names, files.test, "test images")
        start = time.perf_counter()
        model = load_trained_model(fold_cfg, weights)
        load_s += time.perf_counter() - start
        start = time.perf_counter()
        embed_views(model, images.paths, fold_cfg, device, images.load, tuple(cfg.embed.tta))
        embed_s += time.perf_counter() - start
    return {"exp": exp, "models": len(folds), "size": fold_cfg.data.img_size,
            "load_s": load_s, "embed_s": embed_s}


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    runs, overrides = argv[:split], argv[split + 1:]
    if not runs:
        raise SystemExit(__doc__)
    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    names = pair_image_names(read_test_csv(layout.data_files(cfg).test))
    rows = []
    for run in runs:
        exp, _, spec = run.partition(":")
        rows.append(time_experiment(cfg, exp, parse_fold_spec(spec or "all",
                                                              cfg.folds.n_folds), names, device))
    first = rows[0]["embed_s"]
    print(f"{len(names)} test images on {device}, views {', '.join(cfg.embed.tta)}")
    print(markdown_table(["experiment", "models", "input px", "load s", "embed s",
                          "embed vs first"],
                         [[r["exp"], str(r["models"]), str(r["size"]), f"{r['load_s']:.2f}",
                           f"{r['embed_s']:.2f}", f"{r['embed_s'] / first:.2f}x"]
                          for r in rows]))


if __name__ == "__main__":
    main(sys.argv[1:])
