"""``python -m mlfactory <command>`` (also ``.venv/bin/mlfactory``, which ``make venv`` writes):

    init     a pipeline config for your own data files (mlfactory.data.schema_inference)
"""

from __future__ import annotations

import sys

COMMANDS = {"init": "mlfactory.data.schema_inference"}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
