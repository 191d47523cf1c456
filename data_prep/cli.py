"""The command-line conventions every data_prep tool shares (shard.py and the converters).

* an unusable invocation (no such input, unknown column, bad flag) raises :class:`UsageError`:
  one line on stderr, exit status 2 — before any work is done;
* ``--strict`` and a row that has to be skipped raises :class:`StrictError`: exit status 1
  with the row's location and reason;
* a run that cannot finish (a worker process killed, e.g. by the out-of-memory killer) raises
  :class:`RunError`: exit status 1 with what happened and how to continue;
* everything else is the tool's own exit status.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional


class UsageError(Exception):
    """The invocation cannot work at all: exit status 2, one line."""


class StrictError(Exception):
    """``--strict`` and a row had to be skipped: exit status 1."""


class RunError(Exception):
    """The run stopped part-way for a reason outside the input: exit status 1; the message says
    what is kept and how to continue."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one clear line (a UsageError) instead of usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def run_cli(main: Callable[[Optional[list[str]]], int], argv: Optional[list[str]] = None) -> int:
    """Call ``main(argv)`` and map the two failure kinds to exit statuses 2 and 1."""
    try:
        return main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StrictError as e:
        print(f"error (--strict): {e}", file=sys.stderr)
        return 1
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
