"""The levels of the candidate tree: the recursion of the marginal, one token further per level.

Level 0 is the model's own next-token distribution p(y_1 | x<=t) at every context end; its top-p
nucleus gives the first candidates. Level ``d`` feeds every candidate path ``y_1..y_d`` once (one
packed token each, :func:`mtp_lib.marginal.step._candidate_step`) and adds

    p(x_{t+d+1} | x<=t)  +=  w(y_1..y_d) p(x_{t+d+1} | x<=t, y_1..y_d),
    w(y_1..y_d) = prod_k p(y_k | x<=t, y_<k) / (mass of the nucleus y_k was drawn from),

into the marginal of depth ``d + 1``; the nuclei of those distributions are the paths of level ``d + 1``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch.profiler import record_function

from mtp_lib.marginal.context import _Context
from mtp_lib.marginal.nuclei import _nested_nucleus, _row_blocks
from mtp_lib.marginal.plan import _Plan
from mtp_lib.marginal.reduce import _accumulate, _logits_of_rows, _segments
from mtp_lib.marginal.step import _candidate_step


@dataclasses.dataclass
class _Nodes:
    """The candidate paths of one tree level, grouped by context end (as the nuclei come out)."""

    npos: torch.Tensor  # [K] long: index into the positions of each path's context end
    paths: torch.Tensor  # [K, l] long: the tokens y_1..y_l
    log_w: torch.Tensor  # [K, m] float: log w(y_1..y_l) per top-p (-inf: not in that nucleus)

    @staticmethod
    def cat(parts: list[_Nodes]) -> _Nodes:
        return _Nodes(torch.cat([p.npos for p in parts]), torch.cat([p.paths for p in parts]),
                      torch.cat([p.log_w for p in parts]))

    def __getitem__(self, rows: slice | torch.Tensor) -> _Nodes:
        return _Nodes(self.npos[rows], self.paths[rows], self.log_w[rows])


@dataclasses.dataclass
class _Counts:
    """What the levels fed: paths per level, packed tokens and candidate steps."""

    n_nodes: list[int] = dataclasses.field(default_factory=list)
    n_tokens_fed: int = 0
    n_chunks: int = 0


def _first_level(ctx: _Context, hidden: torch.Tensor, plan: _Plan, acc: torch.Tensor
                 ) -> tuple[_Nodes, torch.Tensor, torch.Tensor]:
    """Write log p(y | x<=t) into ``acc [m, P, V]`` and return its nuclei (the first candidates), the
    nucleus sizes at ``top_p`` and their log masses, ``[P]`` each."""
    nodes, sizes0, mass0 = [], [], []
    for blk in _row_blocks(len(plan.pos), plan.vocab, plan.max_logits_elements):
        logits = ctx.adapter.logits(ctx.model, hidden[plan.pos[blk]], normed=True)
        lp = torch.log_softmax(logits.to(ctx.acc_dtype), dim=-1)
        acc[:, blk] = lp
        rows, toks, lw, sizes, log_mass = _nested_nucleus(lp, plan.top_ps, plan.sort_budget)
        nodes.append(_Nodes(rows + blk.start, toks[:, None], lw))
        sizes0.append(sizes[:, -1])
        mass0.append(log_mass[:, -1])
    return _Nodes.cat(nodes), torch.cat(sizes0), torch.cat(mass0)


def _tree_level(ctx: _Context, plan: _Plan, nodes: _Nodes, level: int, acc: torch.Tensor, counts: _Counts,
                grow: bool) -> _Nodes:
    """Feed the paths ``nodes`` of tree level ``level`` and add their weighted next-token
    distributions into ``acc [m, P, V]`` (the marginal of depth ``level + 1``); with ``grow``, return
    the paths of the next level (else ``nodes``)."""
    from tqdm.auto import tqdm

    counts.n_nodes.append(len(nodes.npos))
    leaves_per_row = plan.leaves_per_row(level)
    per_chunk = plan.rows_per_step(ctx.kv_bytes) * leaves_per_row
    bar = tqdm(total=len(nodes.npos), desc=f"marginalize: level {level + 1} of {plan.depth}",
               disable=not plan.progress, leave=False)
    # one wait per level: the steps' layouts and the segments of every logits block are cut on the
    # host, so that nothing below waits for the device (save the exact passes, one step late)
    npos_host, paths_host = nodes.npos.cpu(), nodes.paths.cpu()
    children: list[_Nodes] | None = [] if grow else None
    previous: list[Callable[[], None]] = []  # the exact passes of the step before
    for start in range(0, len(nodes.npos), per_chunk):
        sl = slice(start, min(len(nodes.npos), start + per_chunk))
        with record_function("marginal.candidate_step"):
            hid, n_tok = _candidate_step(ctx, plan.pos_host, npos_host[sl], paths_host[sl], leaves_per_row,
                                         plan.compile, plan.flex)
        counts.n_chunks += 1
        counts.n_tokens_fed += n_tok
        chunk = nodes[sl]
        current = [_reduce_block(ctx, plan, acc, hid[blk], chunk[blk], npos_host[sl][blk], children)
                   for blk in _row_blocks(len(chunk.npos), plan.vocab, plan.max_logits_elements)]
        for finish in previous:  # the step before's, now that this one is queued
            finish()
        previous = current
        bar.update(sl.stop - sl.start)
    for finish in previous:
        finish()
    bar.close()
    return _Nodes.cat(children) if children is not None else nodes


def _reduce_block(ctx: _Context, plan: _Plan, acc: torch.Tensor, hidden: torch.Tensor, nodes: _Nodes,
                  npos_host: torch.Tensor, children: list[_Nodes] | None) -> Callable[[], None]:
    """One logits block of a step: its weighted distributions into ``acc``, its paths' children (their
    nuclei) into ``children`` when given. Returns the block's exact pass, to run once later work is queued."""
    with record_function("marginal.unembedding"):
        logits = ctx.adapter.logits(ctx.model, hidden, normed=True)
    with record_function("marginal.reduce"):
        seg = _segments(npos_host, plan.device)
        recompute = functools.partial(_logits_of_rows, ctx.adapter, ctx.model, hidden)
        finish = _accumulate(acc, logits, nodes.npos, nodes.log_w, seg, recompute)
        assert finish is not None
    if children is not None:
        log_q = torch.log_softmax(logits.to(ctx.acc_dtype), dim=-1)
        rows, toks, lw, _, _ = _nested_nucleus(log_q, plan.top_ps, plan.sort_budget)
        # a path is in the nucleus at top-p q only if every step is: weights add up
        children.append(_Nodes(nodes.npos[rows], torch.cat([nodes.paths[rows], toks[:, None]], dim=1),
                               nodes.log_w[rows] + lw))
    return finish
