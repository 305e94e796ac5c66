"""``python -m marginlab COMMAND``: ``run`` a chapter headless, list or run its training ``jobs``, ``fetch`` data."""
from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m marginlab COMMAND ...

commands:
  run CHAPTER [--profile full|standard|quick] [--smoke]
                    execute a chapter headless: no cell timeout, progress on the terminal,
                    results/<profile>/<chapter>.json; rerun after an interruption to resume
                    (trained models are cached)
  jobs CHAPTER [--run] [--profile P]
                    list (or train) the chapter's model trainings
  fetch all|mnist|cifar10|cifar100 [--root DIR]
                    download the data sets for offline use (= python -m marginlab.data fetch)

CHAPTER is a number (4, 04) or a file stem (04_differential_training).
"""


def _help() -> str:
    from . import runner

    try:
        stems = runner.list_chapters()
    except OSError:
        stems = []
    listing = "\n".join(f"  {s}" for s in stems) if stems else "  (no chapters/ folder found from here)"
    return f"{USAGE}\nchapters:\n{listing}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_help(), end="")
        return 0
    command, rest = args[0], args[1:]
    if command == "run":
        from .runner import main as run_main

        return run_main(rest)
    if command == "jobs":
        from .jobs import main as jobs_main

        return jobs_main(rest)
    if command == "fetch":
        from .data import main as data_main

        return data_main(["fetch", *rest])
    print(f"unknown command {command!r}\n\n{_help()}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
