"""`python -m jaguar_reid.cache [key=value ...]`: the preprocessing cache.

The step itself is `jaguar_reid.data.cache`; this module is its command.
"""

from jaguar_reid.data.cache import main
from jaguar_reid.io_utils import run_main

if __name__ == "__main__":
    run_main(main)
