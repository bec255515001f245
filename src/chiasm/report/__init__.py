"""Turn a run folder into a self-contained HTML report with plots and samples."""

from chiasm.report.html import write_report

__all__ = ["write_report"]
