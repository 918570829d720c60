"""`python -m jaguar_reid.identify PHOTO_OR_FOLDER ... models=PATH`: the same as
`jaguar-reid identify` (see `jaguar_reid.identify.command`)."""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("identify")
