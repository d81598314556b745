"""Old import path of the report entry points, kept until the farm and the CLI import
them from :mod:`tuneqn.controller.report`; nothing else lives here."""

from .compute import is_partial
from .write import write_full_report, write_json

write_json_only = write_json

__all__ = ["is_partial", "write_full_report", "write_json", "write_json_only"]
