"""`python -m jaguar_reid.embed [key=value ...]`: the tuning views of every finished fold.

The step itself is `jaguar_reid.retrieval.embed`; this module is its command.
"""

from jaguar_reid.io_utils import run_main
from jaguar_reid.retrieval.embed import main

if __name__ == "__main__":
    run_main(main)
