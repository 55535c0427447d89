"""How every ``fleetform`` sub-command reports a problem the user can fix.

One line on stderr, ``fleetform COMMAND: error: ...`` (a multi-line message is joined with
``; ``), and exit status 2, never a traceback. Standard library only, so any layer may use it.
"""

from __future__ import annotations

import sys

__all__ = ["EXIT_USAGE", "usage_error"]

EXIT_USAGE = 2


def usage_error(command: str, message: object) -> int:
    """Print ``message`` for ``fleetform COMMAND`` as one line; return :data:`EXIT_USAGE`."""
    lines = [part.strip() for part in str(message).strip().splitlines() if part.strip()]
    print(f"fleetform {command}: error: {'; '.join(lines) or 'error'}", file=sys.stderr)
    return EXIT_USAGE
