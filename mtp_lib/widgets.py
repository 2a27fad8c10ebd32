"""Widgets that stay interactive in the static HTML book, with no kernel behind them.

Only a widget's saved state reaches the HTML page, and Python callbacks run only in a live kernel.
So the widgets here pre-render every view and switch between them in the browser: a selector
(dropdown or slider) is linked on the JavaScript side (``jslink``) to the ``selected_index`` of a
``Stack`` that holds the views.
"""

from __future__ import annotations

import html as _html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["html_table", "picker"]


def html_table(rows: Sequence[Mapping[str, Any]], *, caption: str | None = None) -> str:
    """A small HTML table from a list of dicts (keys of the first row are the columns), text escaped."""
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{_html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    cap = f"<caption>{_html.escape(caption)}</caption>" if caption else ""
    return f"<table class='mtp-table'>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def picker(views: Mapping[str, Any], *, description: str = "", kind: str = "dropdown") -> Any:
    """A selector over named views; each view is an HTML string or a widget. Works in static HTML.

    ``kind="dropdown"`` lists the names; ``kind="slider"`` steps through them in order (the current
    name is shown beside the slider). Views may themselves be pickers, for two-level choices.
    """
    import ipywidgets as w

    if not views:
        raise ValueError("views must hold at least one entry")
    names = list(views)
    children = [v if isinstance(v, w.Widget) else w.HTML(str(v)) for v in views.values()]
    stack = w.Stack(children=children, selected_index=0)
    if kind == "dropdown":
        selector: Any = w.Dropdown(options=names, index=0, description=description)
        w.jslink((selector, "index"), (stack, "selected_index"))  # Dropdown.value is not synced; index is
        return w.VBox([selector, stack])
    if kind == "slider":
        selector = w.IntSlider(min=0, max=len(names) - 1, value=0, description=description, readout=False)
        labels = w.Stack(children=[w.Label(n) for n in names], selected_index=0)
        w.jslink((selector, "value"), (stack, "selected_index"))
        w.jslink((selector, "value"), (labels, "selected_index"))
        return w.VBox([w.HBox([selector, labels]), stack])
    raise ValueError(f"kind={kind!r} must be 'dropdown' or 'slider'")
