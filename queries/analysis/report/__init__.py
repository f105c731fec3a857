"""`actstore report`: one self-contained interactive HTML page about a store.

`data` reads the catalog (SQL), `charts` turns rows into Vega-Lite specifications, `page` writes
the HTML, `sections` puts them together.
"""

from queries.analysis.report.sections import report

__all__ = ["report"]
