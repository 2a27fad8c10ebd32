"""One function per figure of the book; notebooks call them and so do the tests.

Each chapter's figures live in their own module (``plots.data``, ``plots.marginal``, ...); they take
plain data (pandas DataFrames or dicts of results) and return the matplotlib Figure.
"""

from .common import read_paper_csv, setup_style

__all__ = ["read_paper_csv", "setup_style"]
