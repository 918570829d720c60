"""Write the submission of an experiment: `python submit.py exp=NAME [key=value ...]`.

The same as `jaguar-reid submit` (`--help` lists its keys); see src/jaguar_reid/submission.py.
The package is taken from this checkout's src/ whether or not it is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from jaguar_reid.cli import run_step  # noqa: E402

if __name__ == "__main__":
    run_step("submit")
