"""`python -m jaguar_reid.report [key=value ...]`: an experiment's report page.

The step itself is `jaguar_reid.reporting.report`; this module is its command.
"""

from jaguar_reid.io_utils import run_main
from jaguar_reid.reporting.report import main

if __name__ == "__main__":
    run_main(main)
