"""The ``upweight`` command line (``upweight explain``, ``python -m upweight explain``).

The entry point is ``upweight.cli.main.main(argv=None) -> int``. ``ModelSpec`` is what the
function named by ``upweight explain --model FILE.py:FUNCTION`` returns.
"""

from .user_model import ModelSpec

__all__ = ["ModelSpec"]
