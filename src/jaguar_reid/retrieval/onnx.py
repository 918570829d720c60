"""ONNX embedding models: one fold model's retrieval embedding, for onnxruntime.

The ONNX model takes images already prepared the way the run saw them: (N, 3, H, W) float32,
shaped by `data.resize` to `data.img_size` and normalised with the run's saved `data.mean` /
`data.std` (both stored in the model's metadata), and returns the embedding the experiment
submits (`model.retrieval`: neck, backbone or both, L2-normalised as `ReIDModel.embed` does).
The batch axis is dynamic. `onnx` and `onnxruntime` are imported only here, inside the
functions, so the package imports without them.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jaguar_reid.config import Config
from jaguar_reid.data.preprocess import RESIZE_RULES, normalisation
from jaguar_reid.extras import require
from jaguar_reid.io_utils import UserInputError, atomic_path
from jaguar_reid.training.model import ReIDModel

ONNX_INPUT, ONNX_OUTPUT = "images", "embedding"
# The largest difference accepted at export time between onnxruntime's embedding and
# PyTorch's (L2-normalised, so components are at most 1); a tiny model agrees to ~1e-6.
ONNX_TOLERANCE = 1e-3


class OnnxError(UserInputError):
    """An ONNX export that cannot be made or does not reproduce the PyTorch model."""


class RetrievalEmbedding(nn.Module):
    """Images -> the one retrieval embedding `kind` of a trained model, L2-normalised."""

    def __init__(self, model: ReIDModel, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)[self.kind]


def probe_images(cfg: Config, n: int, seed: int = 0) -> torch.Tensor:
    """`n` seeded random images as the model takes them (normalised, `data.img_size`): enough
    to compare two implementations of the same embedding, whatever the data."""
    generator = torch.Generator().manual_seed(seed)
    size = int(cfg.data.img_size)
    return torch.randn(n, 3, size, size, generator=generator)


@torch.no_grad()
def torch_embed(model: ReIDModel, kind: str, images: torch.Tensor) -> np.ndarray:
    """The retrieval embedding `kind` of a batch, float32, on the CPU."""
    return RetrievalEmbedding(model.eval().cpu(), kind)(images).float().numpy()


def input_metadata(cfg: Config) -> dict[str, str]:
    """What a caller of the ONNX model must know about its input and output (JSON values)."""
    mean, std, _ = normalisation(cfg)
    data = cfg.data
    values = {"input": f"{ONNX_INPUT}: (N, 3, {data.img_size}, {data.img_size}) float32, "
                       "RGB, (pixel / 255 - mean) / std",
              "mean": list(mean), "std": list(std), "img_size": data.img_size,
              "resize": data.resize, "resize_rule": RESIZE_RULES[data.resize],
              "interpolation": data.interpolation, "alpha": data.alpha,
              "backbone": cfg.model.backbone, "retrieval": cfg.model.retrieval,
              "output": f"{ONNX_OUTPUT}: (N, D) float32, L2-normalised; cosine = dot product"}
    return {key: json.dumps(value) for key, value in values.items()}


def _classic_exporter() -> dict:
    """The TorchScript-based exporter: the torch.export-based one (the default since torch
    2.9) needs `onnxscript`, which this project does not install."""
    parameters = inspect.signature(torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in parameters else {}


def export_onnx(model: ReIDModel, cfg: Config, path: str | Path, opset: int) -> Path:
    """Write the model's retrieval embedding (`cfg.model.retrieval`) as an ONNX model at
    `path` (atomically), its input settings in the model's metadata."""
    onnx = require("onnx", "export.onnx=true")
    module = RetrievalEmbedding(model.eval().cpu(), cfg.model.retrieval)
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        with warnings.catch_warnings():
            # The classic exporter's deprecation notice and tracer notes are not for users.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (probe_images(cfg, 2),), str(tmp),
                              input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                              opset_version=int(opset), do_constant_folding=True,
                              **_classic_exporter())
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, input_metadata(cfg))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def onnx_embed(path: str | Path, images: np.ndarray) -> np.ndarray:
    """The ONNX model's embedding of a prepared batch (N, 3, H, W), with onnxruntime."""
    ort = require("onnxruntime", "running an ONNX model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: np.asarray(images, np.float32)})[0]


def onnx_difference(path: str | Path, model: ReIDModel, cfg: Config,
                    n: int = 3) -> float | None:
    """Largest absolute difference between onnxruntime's and PyTorch's embeddings of `n`
    probe images (another batch size than the export's, so the batch axis is checked too);
    None when onnxruntime is not installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    images = probe_images(cfg, n, seed=1)
    expected = torch_embed(model, cfg.model.retrieval, images)
    got = onnx_embed(path, images.numpy())
    if got.shape != expected.shape:
        raise OnnxError(f"{path}: embeddings of shape {got.shape}, PyTorch's {expected.shape}")
    return float(np.abs(got - expected).max())
