"""`python -m jaguar_reid.cache [key=value ...]`: the preprocessing cache.

The same as `jaguar-reid cache` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("cache")
