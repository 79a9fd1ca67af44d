"""Diagnose a configuration before hours of training: is it going to learn anything?

``run_diagnostics`` runs every check and returns the report (runner.py says which checks, for which
models, in what order); ``format_table`` renders it for a terminal. Each family of checks is a module
of its own, with the thresholds it judges by and the reasons for them.
"""

from sunfish.diagnose.runner import run_diagnostics
from sunfish.diagnose.table import format_table

__all__ = ["format_table", "run_diagnostics"]
