"""The one way the bundle's fire CLIs run: INFO logging, and bad input reported as one line instead of a traceback."""

import logging
import sys


def run(main):
    """``fire.Fire(main)``; an ``OSError`` or ``ValueError`` (missing file, broken case, refused overwrite) exits 1
    with ``error: <message>``, which names the case and the file."""
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire(main)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
