"""Copyright reports: which training images influenced one image, whose work it is (groups), how
sure we are (stability, agreement, LDS), and whether it is a near copy.

``write_report(ReportRequest(...))`` writes ``report.html`` (self-contained), ``report.pdf`` (the
same page printed by headless Chromium) and ``report.json`` (every number, validated by
``assets/report_schema.json``). Modules: :mod:`.inputs` (query, attributor folders),
:mod:`.nearcopy`, :mod:`.agreement`, :mod:`.groups`, :mod:`.journey`, :mod:`.quality` (one section
each), :mod:`.content` (the JSON), :mod:`.render` (HTML/PDF), :mod:`.build` (the order of work).
Nothing below this package imports it.
"""

from diffattr.report.build import ReportRequest, ReportResult, write_report

__all__ = ["ReportRequest", "ReportResult", "write_report"]
