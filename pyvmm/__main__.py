"""The `pyvmm` command's entry point (`python -m pyvmm`, and the installed `pyvmm` script).

It imports nothing but `sys` before it can catch a KeyboardInterrupt, so a Ctrl-C while the
rest of pyvmm is still being imported ends in one line and status 130, not a traceback.
"""

import sys

EXIT_INTERRUPTED = 130  # 128 + SIGINT


def main() -> int:
    try:
        from pyvmm.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print("pyvmm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
