"""`python -m wrapguard` is the same as the `wrapguard` command."""

from wrapguard.cli import main

if __name__ == "__main__":
    main()
