"""The ONNX model's input prepared outside this package: the sketch in docs/export.md, run as
written, against the pipeline's own evaluation input for the same photo, and the rule the
model's metadata states for every `data.resize` mode."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaguar_reid.config import load_config
from jaguar_reid.data.augment import build_transform
from jaguar_reid.data.images import image_loader
from jaguar_reid.data.preprocess import RESIZE_MODES, RESIZE_RULES, normalisation
from jaguar_reid.retrieval.onnx import input_metadata

from .helpers import REPO, TINY_ARGS

SIZE = 48


def _sketch_prepare(meta: dict):
    """docs/export.md's `prepare`, defined from the document's own text."""
    text = (REPO / "docs" / "export.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index("## Running the ONNX model"):],
                      re.S).group(1)
    source = block[block.index("def prepare"):block.index("\nemb = ")]
    from PIL import ImageOps

    scope = {"np": np, "Image": Image, "ImageOps": ImageOps, "meta": meta,
             "size": meta["img_size"], "mean": np.array(meta["mean"]),
             "std": np.array(meta["std"])}
    exec(source, scope)  # noqa: S102 - the document's code is what is under test
    return scope["prepare"]


def _photo(path: Path) -> Path:
    """A smooth 120 x 80 landscape JPEG stored on its side (EXIF orientation 6): a camera
    trap's photo as a phone might save it."""
    y, x = np.mgrid[0:80, 0:120].astype(np.float64)
    rgb = np.stack([x * 2, y * 3, 128 + 60 * np.sin(x / 9) * np.cos(y / 7)], axis=-1)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).transpose(Image.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: the viewer rotates it back upright
    image.save(path, quality=95, exif=exif)
    return path


def _config(resize: str):
    return load_config([*TINY_ARGS, f"data.img_size={SIZE}", f"data.resize={resize}"])


@pytest.mark.parametrize("resize", ["auto", "crop", "squash"])
def test_the_documented_sketch_prepares_what_the_pipeline_feeds(tmp_path, resize):
    cfg = _config(resize)
    meta = {k: json.loads(v) for k, v in input_metadata(cfg).items()}
    photo = _photo(tmp_path / "photo.jpg")
    sketch = _sketch_prepare(meta)(photo)
    pipeline = build_transform(cfg, train=False)(image_loader(cfg)(photo)).numpy()
    assert sketch.shape == pipeline.shape == (3, SIZE, SIZE) and sketch.dtype == np.float32
    # Pillow's bicubic against OpenCV's area resize: close, not equal.
    near = float(np.abs(sketch - pipeline).mean())
    assert near < 0.02, near
    # The other geometry (squash for auto and crop, the centre square for squash), or the
    # photo left on its side, would be far off: the check can tell.
    other = _config("squash" if resize != "squash" else "auto")
    for wrong in (build_transform(other, train=False)(image_loader(other)(photo)).numpy(),
                  np.rot90(pipeline, axes=(1, 2))):
        far = float(np.abs(wrong - pipeline).mean())
        print(f"{resize}: sketch vs pipeline {near:.4f}, a wrong input {far:.4f}")
        assert far > 5 * near


def test_the_metadata_states_every_modes_rule():
    assert set(RESIZE_RULES) == set(RESIZE_MODES)
    for resize in RESIZE_MODES:
        cfg = _config(resize)
        meta = input_metadata(cfg)
        assert meta["resize"] == f'"{resize}"'
        assert meta["resize_rule"] == json.dumps(RESIZE_RULES[resize])
        mean, std, _ = normalisation(cfg)
        assert meta["mean"] == json.dumps(list(mean))
