"""`python -m jaguar_reid.embed [key=value ...]`: out-of-fold view embeddings for tuning.

The same as `jaguar-reid embed` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("embed")
