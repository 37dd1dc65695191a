"""Bringing data over from other schedulers: today, Kairoi's log files.

`kairoi_log` reads Kairoi's format (sans-io); `kairoi_import` is the
`import-kairoi` command that writes it into the store.
"""

from kairoi_trio.migration.kairoi_import import add_import_command, run_import_command

__all__ = ["add_import_command", "run_import_command"]
