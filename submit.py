"""Write the submission of an experiment: `python submit.py exp=NAME [key=value ...]`.

See src/jaguar_reid/submission.py; every key of configs/default.yaml can be overridden here.
The package is taken from this checkout's src/ whether or not it is installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from jaguar_reid.io_utils import run_main  # noqa: E402
from jaguar_reid.submission import main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
