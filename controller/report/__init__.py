"""The study report: computed from the store (:mod:`.compute`), written as files (:mod:`.write`).

Entry points: :func:`write_json` (report.json only, the checkpoint view),
:func:`write_full_report` (report.json, plots, report.html) and :func:`is_partial`.
"""

from .compute import compute_report, is_partial
from .write import write_full_report, write_json

__all__ = ["compute_report", "is_partial", "write_full_report", "write_json"]
