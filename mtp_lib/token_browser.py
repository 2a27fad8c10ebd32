"""Chapter 4's token browser: what each speculative row generated, pass by pass, as static HTML.

Per model and prompt, every row's new tokens are drawn with a grey bar after each forward pass and
the accepted drafts highlighted (the token after them is head 1's choice in that pass). The token
strings come from the model's tokenizer once and are cached (result ``ch04-text``, keyed by the
model, the run's key and the prompts shown), so that a rebuild loads no model.
"""

from __future__ import annotations

import argparse
import html as _html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["browser", "chosen_prompts", "prompt_view", "steps_html", "token_text"]

Pieces = Mapping[str, str]


def chosen_prompts(run: Mapping[str, Any], per_task: int) -> list[list[str]]:
    """The first ``per_task`` prompts of each task in the run's records, as ``[task, prompt id]``."""
    found: dict[str, list[str]] = {}
    for rec in run["result"]["per_prompt"]:
        ids = found.setdefault(rec["task"], [])
        if rec["prompt"] not in ids and len(ids) < per_task:
            ids.append(rec["prompt"])
    return [[task, pid] for task, ids in found.items() for pid in ids]


def token_text(run: Mapping[str, Any], chosen: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The strings of the token ids the browser shows and the last 48 prompt tokens (loads the tokenizer)."""
    import torch

    from .models import load_model
    from .spec_runs import load_benchmark

    tok = load_model(run["result"]["model"]["name"], device="cpu", progress=lambda msg: None).tokenizer
    args = argparse.Namespace(**run["result"]["settings"])
    prompts = {(p.task, p.id): p.ids[0].tolist() for p in load_benchmark().eval_prompts(tok, args, torch.device("cpu"))}
    tails = {f"{task}|{pid}": prompts[task, pid][-48:] for task, pid in chosen}
    ids = {i for tail in tails.values() for i in tail}
    ids |= {i for rec in run["result"]["per_prompt"] if [rec["task"], rec["prompt"]] in [list(c) for c in chosen]
            for i in rec["new_token_ids"]}
    return {"prompt_tails": tails, "prompt_tokens": {k: len(prompts[k.split("|", 1)[0], k.split("|", 1)[1]]) for k in tails},
            "pieces": {str(i): tok.decode([i]) for i in sorted(ids)}}


def _show(piece: str) -> str:
    return _html.escape(piece).replace("\n", "⏎<br>")


def steps_html(ids: Sequence[int], lengths: Sequence[int], pieces: Pieces) -> str:
    """The tokens ``ids`` split into passes of ``lengths`` tokens: drafts highlighted, a bar after each pass."""
    if sum(lengths) != len(ids):
        raise ValueError(f"the accepted lengths sum to {sum(lengths)} tokens but {len(ids)} tokens were generated")
    out, i = [], 0
    for a in lengths:
        drafts, last = ids[i:i + a - 1], ids[i + a - 1:i + a]
        if drafts:
            out.append("<span style='background:#b9e3b9;border-radius:3px'>"
                       + "".join(_show(pieces[str(t)]) for t in drafts) + "</span>")
        out.append("".join(_show(pieces[str(t)]) for t in last) + "<span style='color:#bbb'>|</span>")
        i += a
    return "".join(out)


def prompt_view(run: Mapping[str, Any], texts: Mapping[str, Any], task: str, pid: str) -> str:
    """One prompt's tail and, per speculative row, its passes (tau, and whether it equals greedy decoding)."""
    key = f"{task}|{pid}"
    tail = "".join(_show(texts["pieces"][str(t)]) for t in texts["prompt_tails"][key])
    parts = [f"<p><b>{_html.escape(task)}</b>, prompt <code>{_html.escape(pid)}</code> "
             f"({texts['prompt_tokens'][key]} tokens; the last {len(texts['prompt_tails'][key])} shown)</p>",
             f"<div style='color:#777;font-family:monospace;white-space:pre-wrap'>...{tail}</div>"]
    for rec in run["result"]["per_prompt"]:
        if (rec["task"], rec["prompt"]) != (task, pid) or rec["method"] in ("generate", "greedy_graph"):
            continue
        lengths = rec["accepted_lengths"]
        if not lengths:
            parts.append(f"<p><code>{rec['method']}</code>: passes not recorded</p>")
            continue
        tau = sum(lengths[1:]) / max(len(lengths) - 1, 1)
        same = "identical to greedy" if rec.get("identical_to_greedy") else "DIFFERS from greedy"
        parts.append(f"<p style='margin-bottom:2px'><code>{rec['method']}</code>: {rec['new_tokens']} tokens in "
                     f"{len(lengths)} passes, tau {tau:.2f}, {same}</p><div style='font-family:monospace;"
                     f"white-space:pre-wrap;line-height:1.7'>{steps_html(rec['new_token_ids'], lengths, texts['pieces'])}</div>")
    return "".join(parts)


def browser(runs: Mapping[str, Mapping[str, Any]], *, per_task: int, profile: str, recompute: bool = False) -> Any:
    """A picker over models (when several) and prompts, each view a :func:`prompt_view`; None without runs."""
    from . import widgets
    from .results import cached
    from .spec_runs import VERSIONS

    views = {}
    for name, run in runs.items():
        chosen = chosen_prompts(run, per_task)
        texts = cached("ch04-text", {"model": name, "run": run["key"], "prompts": chosen},
                       lambda run=run, chosen=chosen: token_text(run, chosen), profile=profile,  # type: ignore[misc]
                       recompute=recompute, version=VERSIONS["ch04-text"]).value
        views[name] = widgets.picker({f"{task}: {pid}": prompt_view(run, texts, task, pid) for task, pid in chosen},
                                     description="prompt")
    if not views:
        return None
    return widgets.picker(views, description="model") if len(views) > 1 else next(iter(views.values()))
