"""``python -m nucseg``: the ``nucseg`` command, for environments without the console script on PATH.

This is the one place the library names the CLI package, and it is allowed because nothing imports it:
Python runs this file only for ``python -m nucseg``, never on ``import nucseg``, so the rule "the library
never imports the CLI" holds for every library use. The import is inside :func:`main` so that even importing
this module (say, by a documentation tool) stays free of the CLI.
"""

import sys


def main() -> int:
    from nucseg_cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
