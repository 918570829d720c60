"""`python -m jaguar_reid.demo_data [key=value ...]`: the synthetic demo data.

The same as `jaguar-reid demo_data` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("demo_data")
