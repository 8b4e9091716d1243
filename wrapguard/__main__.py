"""`python -m wrapguard` is the same as the `wrapguard` command (whose entry point is `main`)."""

from typing import NoReturn

from wrapguard import startup


def main() -> NoReturn:
    startup.pause()  # before click and the command line load, not only once they have
    from wrapguard.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
