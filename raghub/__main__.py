"""`raghub` and `python -m raghub`: the CLI, with Ctrl-C at any point (start-up included)
ending in one line and exit code 130 instead of a traceback."""

import sys


def main() -> None:
    try:
        from raghub.cli import cli

        cli(prog_name="raghub")
    except KeyboardInterrupt:
        print("raghub: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
