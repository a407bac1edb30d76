"""MkDocs hooks of the docs site (``hooks:`` in mkdocs.yml); ``docs/hooks/`` itself is excluded
from the site.

1. The committed reports (``experiments/results/<name>/``: ``REPORT.md`` or ``report.md``, their
   plots, ``config.json``, ``numbers.json``, ``sweep.csv``, ...) become pages and files of the
   site under ``reports/<name>/``, read from where they are (nothing is copied into ``docs/``).
   A docs page links to ``../reports/smollm2/REPORT.md``; a report's own relative links (its
   plots, the other reports) work as they do in the checkout, and strict mode checks them all.
2. The docstrings are prose with Sphinx cross-reference roles (``:func:`x```, ``:mod:`~a.b```),
   which Markdown shows as the role's name before a code span: the role (and the ``~``) is
   dropped from the rendered HTML, leaving the code span.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "experiments/results"
REPORTS = "reports"
SUFFIXES = {".md", ".png", ".svg", ".json", ".csv"}
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const):(<code[^>]*>)~?")


def on_files(files, config):
    results = Path(config["config_file_path"]).parent / RESULTS
    if not results.is_dir():
        raise FileNotFoundError(f"docs: no {RESULTS} directory at {results} (the reports' pages)")
    for path in sorted(results.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            uri = f"{REPORTS}/{path.relative_to(results).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_content(html, page, config, files):
    return ROLE.sub(r"\1", html)
