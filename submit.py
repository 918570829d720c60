"""Write the submission of an experiment: `python submit.py exp=NAME [key=value ...]`.

See src/submission.py; every key of configs/default.yaml can be overridden here.
"""

from src.io_utils import run_main
from src.submission import main

if __name__ == "__main__":
    run_main(main)
