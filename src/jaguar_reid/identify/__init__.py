"""Identification: which known individual a new photo shows, or that it shows a new one, with
probabilities and a new-individual threshold fitted out of fold (docs/identify.md).

- `calibrate` (python -m jaguar_reid.identify.calibrate): fits the calibration on
  out-of-fold queries and saves it, with the gallery, beside the experiment.
- `Identifier` (`identifier`): the Python API, `Identifier.load(path).identify(paths)`.
- `command` (jaguar-reid identify): the same, writing identify.csv and identify.html.

`Identifier`, `Identification` and `Candidate` are imported from here on first use, so that
importing the package does not load torch.
"""

from __future__ import annotations

from typing import Any

_API = ("Identifier", "Identification", "Candidate")


def __getattr__(name: str) -> Any:
    if name in _API:
        from jaguar_reid.identify import identifier

        return getattr(identifier, name)
    raise AttributeError(f"module 'jaguar_reid.identify' has no attribute {name!r}")
