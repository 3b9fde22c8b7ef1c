"""Command line: ``vdit-compile <command>``; one module per command (``cmd_<name>.py``)."""
