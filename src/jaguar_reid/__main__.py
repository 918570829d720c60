"""`python -m jaguar_reid <step> [key=value ...]`: the same as the `jaguar-reid` command."""

from jaguar_reid.cli import main

if __name__ == "__main__":
    main()
