"""The ``upweight`` command line (``upweight explain``, ``python -m upweight explain``).

The entry point is ``upweight.cli.main.main(argv=None) -> int``.
"""
