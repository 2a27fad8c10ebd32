"""The book's token browsers: pre-rendered HTML views behind :func:`mtp_lib.widgets.picker` selectors,
so that they work in the static pages without a kernel.

- :func:`tokenization_browser` (Chapter 0): how each tokenizer cuts a translation target;
- :func:`marginal_browser` (Chapter 1): the top next and 2nd tokens of the marginal at a position;
- :func:`layer_browser` (Chapter 2): the top tokens of each layer's logit lens at a position.

Each takes the stored results of its chapter (plain dicts) and builds the nested pickers.
"""

from __future__ import annotations

import html as _html
from collections.abc import Mapping, Sequence
from typing import Any

from mtp_lib import widgets

__all__ = ["GREEN", "ORANGE", "layer_browser", "marginal_browser", "marginal_view", "tokenization_browser",
           "tokenization_view", "visible"]

GREEN, ORANGE = "#c9e7c9", "#f6d5ad"  # the next token, the token after it


def visible(token: str) -> str:
    """A token as HTML with its spaces and newlines shown (␣, ⏎); ∅ for the empty string."""
    return _html.escape(token).replace(" ", "␣").replace("\n", "⏎") or "∅"


def _top_table(entries: Sequence[Sequence[Any]], ref: str, color: str, title: str) -> str:
    rows = []
    for i, (tok, p) in enumerate(entries):
        style = f' style="background:{color}"' if tok == ref else ""
        rows.append(f"<tr{style}><td>{i}</td><td><code>{visible(tok)}</code></td><td>{p:.3f}</td></tr>")
    return (f"<div style='display:inline-block;vertical-align:top;margin-right:2em'><b>{title}</b>"
            f"<table class='mtp-table'><thead><tr><th>rank</th><th>token</th><th>p</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def marginal_view(e: Mapping[str, Any], top_p: float) -> str:
    """One position of Chapter 1's browser: the context, the references and their ranks, the nucleus,
    and the top tokens of the next-token distribution and of the 2nd-token marginal."""
    ctx = ("…" if e["truncated"] else "") + "".join(_html.escape(x) for x in e["context"])
    refs = (f"<span style='background:{GREEN}'>{visible(e['ref'][0])}</span>"
            f"<span style='background:{ORANGE}'>{visible(e['ref'][1])}</span>")
    head = (f"<p style='font-family:monospace;white-space:pre-wrap'>{ctx}{refs}</p>"
            f"<p>reference x<sub>t+1</sub> <code>{visible(e['ref'][0])}</code>: rank {e['rank'][0]}; reference "
            f"x<sub>t+2</sub> <code>{visible(e['ref'][1])}</code>: rank {e['rank'][1]}. Nucleus: {e['candidates']} "
            f"candidates holding {e['mass']:.3f} of the mass.</p>")
    return head + _top_table(e["top"][0], e["ref"][0], GREEN, "next token x<sub>t+1</sub>") + _top_table(
        e["top"][1], e["ref"][1], ORANGE, f"2nd token x<sub>t+2</sub> (top-{top_p:g} marginal)")


def marginal_browser(results: Mapping[tuple[str, str], Any], top_p: float) -> Any:
    """Model > task > sample > position pickers over the ``browser`` entries of Chapter 1's results
    (``{(model, task): CachedResult}``); None when no sample has browser entries."""
    by_model: dict[str, Any] = {}
    for (model, task), res in results.items():
        per_sample = {}
        for rec in res.value["samples"]:
            if "browser" in rec:
                per_sample[rec["id"]] = widgets.picker(
                    {f"t = {e['t']}: {visible(e['ref'][0])} {visible(e['ref'][1])}": marginal_view(e, top_p)
                     for e in rec["browser"]}, description="position", kind="slider")
        if per_sample:
            by_model.setdefault(model, {})[task] = widgets.picker(per_sample, description="sample")
    if not by_model:
        return None
    return widgets.picker({m: widgets.picker(t, description="task") for m, t in by_model.items()},
                          description="model")


def tokenization_view(pair: Any, samples: Mapping[str, Any], tokenizers: Mapping[str, Any],
                      evaluated: Mapping[str, set[int]]) -> str:
    """A translation pair, and each model's tokens of its target (``|``-separated; evaluated ones bold)."""
    parts = [f"<p><b>Spanish</b>: {_html.escape(pair.source)}<br><b>English</b>: {_html.escape(pair.target)}</p>"]
    for name, tok in tokenizers.items():
        sample = samples[name]
        pieces = [(_html.escape(tok.decode([t])), j in evaluated[name])
                  for j, t in enumerate(sample.input_ids) if j >= sample.target_start]
        toks = "|".join(f"<b>{p}</b>" if ev else p for p, ev in pieces)
        parts.append(f"<p><code>{name}</code> ({len(pieces)} target tokens): "
                     f"<span style='font-family:monospace'>{toks}</span></p>")
    return "".join(parts)


def tokenization_browser(tokenizers: Mapping[str, Any], n: int, last_tokens: int = 20) -> Any:
    """Chapter 0's sample picker: the first ``n`` translation samples, tokenized by every model."""
    from mtp_lib import data

    by_id = {p.id: p for p in data.load_translation("validation")}
    samples = {name: {s.id: s for s in data.translation_samples(tok, n)} for name, tok in tokenizers.items()}
    ids = list(next(iter(samples.values())))
    views = {}
    for i in ids:
        per_model = {name: samples[name][i] for name in tokenizers}
        evaluated = {name: set(data.evaluation_targets(s, last_tokens)) for name, s in per_model.items()}
        views[i] = tokenization_view(by_id[i], per_model, tokenizers, evaluated)
    return widgets.picker(views, description="sample")


# --------------------------------------------------------------------------------------------------
# Chapter 2: the layers


def _layer_view(sent: Mapping[str, Any], view: Mapping[str, Any], entry: Mapping[str, Any], n_layers: int,
                style: tuple[Any, Any]) -> Any:
    import ipywidgets as w

    i = view["target_index"]
    nxt = sent["tokens"][i]
    after = sent["tokens"][i + 1] if i + 1 < len(sent["tokens"]) else None
    rows = []
    for rank, (tok, p) in enumerate(zip(entry["tokens"], entry["probs"])):
        color = GREEN if tok == nxt else ORANGE if after is not None and tok == after else ""
        css = f" style='background:{color}'" if color else ""
        rows.append(f"<tr{css}><td>{rank}</td><td><code>{visible(tok)}</code></td><td>{p:.3f}</td></tr>")
    r2 = entry["rank_2nd"]
    head = (f"<p>layer {entry['layer']} of {n_layers}: entropy {entry['entropy']:.2f} nats; rank of "
            f"x<sub>t+1</sub> <code>{visible(nxt)}</code>: {entry['rank_next']}"
            + (f", of x<sub>t+2</sub> <code>{visible(after)}</code>: {r2}" if r2 is not None and after is not None
               else "") + "</p>")
    table = "<table class='mtp-table'><thead><tr><th>rank</th><th>token</th><th>p</th></tr></thead><tbody>"
    return w.HTML(head + table + "".join(rows) + "</tbody></table>", layout=style[0], style=style[1])


def _position_view(sent: Mapping[str, Any], view: Mapping[str, Any], n_layers: int, style: tuple[Any, Any]) -> Any:
    import ipywidgets as w

    i = view["target_index"]
    toks = []
    for j, tok in enumerate(sent["tokens"]):
        color = GREEN if j == i else ORANGE if j == i + 1 else ""
        body = visible(tok) if color else _html.escape(tok)
        toks.append(f"<span style='background:{color}'>{body}</span>" if color else
                    f"<span style='color:#888'>{body}</span>" if j > i + 1 else body)
    context = w.HTML("<p style='font-family:monospace'>" + "".join(toks) + "</p>", layout=style[0], style=style[1])
    layers = {f"layer {e['layer']}/{n_layers}": _layer_view(sent, view, e, n_layers, style) for e in view["layers"]}
    return w.VBox([context, widgets.picker(layers, description="layer")])  # a dropdown: no label per layer


def layer_browser(results: Mapping[str, Any]) -> Any:
    """Model > sample > position > layer pickers over Chapter 2's ``ch02-sentences`` results
    (``{model: CachedResult}``)."""
    import ipywidgets as w
    from ipywidgets.widgets.widget_string import HTMLStyle

    style = (w.Layout(), HTMLStyle())  # shared by all views: keeps the saved page small
    browser = {}
    for name, res in results.items():
        n_layers = res.value["n_layers"]
        per_sample = {}
        for sent in res.value["sentences"]:
            label = "paper's sentence (our Spanish)" if sent["id"].startswith("ours/") else sent["id"].split("/")[-1]
            views = {}
            for v in sent["views"]:
                tok = sent["tokens"][v["target_index"]]
                views[f"{v['target_index'] + 1}. {tok.strip() or visible(tok)}"] = _position_view(sent, v, n_layers,
                                                                                                  style)
            per_sample[label] = widgets.picker(views, description="predict", kind="slider")
        browser[name] = widgets.picker(per_sample, description="sample")
    return widgets.picker(browser, description="model")
