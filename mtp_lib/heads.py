"""Multi-token prediction heads on a pretrained causal LM (the paper's Section 3).

:class:`MTPModel` splits a model of L decoder layers into a *backbone* (embedding and layers
1..L-1) and ``n_heads`` heads. Head n predicts x_{t+n} from the context X<=t:

    p(x_{t+n} | X<=t) = softmax(f_u(head_n(z^{L-1}_t)))

where f_u is the model's own final norm, unembedding and any logit soft-capping, shared by all
heads and frozen. Two head types:

- ``head_type="layer"`` (the paper): each head is a copy of the last decoder layer. Head 1 starts as
  the original last layer, so at initialization it reproduces the model's next-token output; the
  other heads start from the model family's random initialization (``head_init="random"``, the
  paper) or as copies of the last layer too (``head_init="copy"``: every head starts by predicting
  x_{t+1} and learns the shift; not in the paper, for speculative decoding). With
  ``weighted_hidden_states=True`` (WHS) head n reads softmax(w_n / 0.1) . [z^1 .. z^{L-1}] instead of
  z^{L-1}, with w_n in R^{L-1} initialized to 0.1 (uniform mixture; the embedding output is not
  included).
- ``head_type="medusa"`` (Medusa-1, for comparison): the backbone is the whole model; head 1 is the
  model's own next-token output (no parameters) and head n >= 2 is a residual block
  h + SiLU(W h + b) (W zero-initialized) on the final normed hidden state h, followed by the shared
  unembedding. So Medusa block k (head k + 1) predicts x_{t+k+1}, and "head n predicts x_{t+n}" holds
  for both types.

Nothing is copied that need not be: the backbone shares the given model's parameters (its module
tree is a shallow copy with new containers), so building an MTPModel leaves the model unchanged and
costs the memory of the heads only. Moving the MTPModel to another device or dtype moves those shared
parameters too.

Each layer head is a one-layer version of the model's own base model (same rotary embeddings, masks,
sliding/global layer types and KV cache as the original), fed with ``inputs_embeds=z``; GPT-2's
position embeddings are switched off there, since z already carries them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mtp_lib.head_parts import (HEAD_INITS, HEAD_TYPES, HiddenStateMix, LayerHead, MedusaHead, MTPCache, MTPOutput,
                                 NextTokenHead, _config_with_layers, _NoPositions, shallow_module_copy)
from mtp_lib.inputs import as_model
from mtp_lib.models import Adapter, get_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "HEAD_INITS",
    "HEAD_TYPES",
    "HiddenStateMix",
    "LayerHead",
    "MTPCache",
    "MTPModel",
    "MTPOutput",
    "MedusaHead",
    "NextTokenHead",
    "shallow_module_copy",
]


# --------------------------------------------------------------------------------------------------
# The model


def _check_options(n_heads: Any, head_type: str, head_init: str, weighted_hidden_states: bool, n_layers: int) -> None:
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads={n_heads!r} must be a positive integer (the paper uses 2)")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type={head_type!r} must be one of {HEAD_TYPES}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init={head_init!r} must be one of {HEAD_INITS}")
    if head_init != "random" and head_type != "layer":
        raise ValueError(f"head_init={head_init!r} needs head_type='layer' (Medusa blocks start as the "
                         "identity already)")
    if weighted_hidden_states and head_type != "layer":
        raise ValueError("weighted_hidden_states=True needs head_type='layer' (Medusa heads read the "
                         "final hidden state)")
    if n_layers < 2:
        raise ValueError(f"the model has {n_layers} decoder layer(s); MTP heads need at least 2")


class MTPModel(nn.Module):
    """A causal LM turned into a backbone plus ``n_heads`` multi-token prediction heads.

    ``MTPModel(model)(input_ids).logits`` has shape [n_heads, B, T, V]; ``logits[n - 1, :, t]``
    predicts x_{t+n}. ``heads[n - 1]`` is head n. ``seed`` fixes the random initialization of heads
    2..n (the global RNG is left as it was). See the module docstring for the two head types and
    ``head_init`` (layer heads 2..n: ``"random"``, the paper, or ``"copy"`` of the last layer).
    """

    def __init__(self, model: Any, n_heads: int = 2, weighted_hidden_states: bool = False,
                 head_type: str = "layer", *, seed: int = 0, head_init: str = "random") -> None:
        super().__init__()
        model = as_model(model)
        adapter = get_adapter(model)
        n_layers = adapter.n_layers(model)
        _check_options(n_heads, head_type, head_init, weighted_hidden_states, n_layers)
        self.adapter: Adapter = adapter
        self.n_heads = n_heads
        self.head_type = head_type
        self.head_init = head_init
        self.weighted_hidden_states = bool(weighted_hidden_states)
        self.n_layers = n_layers
        self.seed = seed
        vocab, hidden = adapter.unembed_weight(model).shape
        self.vocab_size, self.hidden_size = int(vocab), int(hidden)
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None) or None

        base = adapter.base(model)
        all_types: list[str] | None = getattr(base.config, "layer_types", None)
        n_backbone = n_layers - 1 if head_type == "layer" else n_layers
        self.backbone = self._backbone(base, n_backbone, all_types)
        self.final_norm = shallow_module_copy(adapter.final_norm(model))
        self.unembed = shallow_module_copy(adapter.unembed(model))
        self.heads = nn.ModuleList(self._new_heads(model, base, all_types))
        self.train(model.training)  # the model's mode (eval: no dropout), for the new parts too

    # -- construction ------------------------------------------------------------------------------

    def _new_heads(self, model: nn.Module, base: nn.Module, all_types: list[str] | None) -> list[nn.Module]:
        """Heads 1..n_heads: Medusa blocks, or copies of the last layer (heads 2..n re-initialized with
        ``head_init="random"``), drawn from the RNG seeded with ``seed`` (the global RNG is left as it was)."""
        n_layers, config = self.n_layers, base.config
        last = self.adapter.layers(model)[n_layers - 1]
        ref = next(last.parameters())
        heads: list[nn.Module] = []
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(self.seed)
            for n in range(1, self.n_heads + 1):
                if self.head_type == "medusa":
                    heads.append(NextTokenHead() if n == 1 else
                                 MedusaHead(self.hidden_size, dtype=ref.dtype, device=ref.device))
                    continue
                layer = copy.deepcopy(last, memo={id(config): config, id(model.config): model.config})
                if n > 1 and self.head_init == "random":
                    for sub in layer.modules():
                        cast("PreTrainedModel", model)._init_weights(sub)
                mix = (HiddenStateMix(n_layers - 1, dtype=ref.dtype, device=ref.device)
                       if self.weighted_hidden_states else None)
                types = None if all_types is None else [all_types[n_layers - 1]]
                heads.append(LayerHead(self._head_body(base, layer, types), mix))
        return heads

    def _backbone(self, base: nn.Module, n_layers: int, layer_types: list[str] | None) -> nn.Module:
        """A shallow copy of the base model with its first ``n_layers`` layers and no final norm."""
        a = self.adapter
        backbone = shallow_module_copy(base)
        layers = getattr(backbone, a.layers_attr)
        setattr(backbone, a.layers_attr, nn.ModuleList(list(layers)[:n_layers]))
        setattr(backbone, a.norm_attr, nn.Identity())
        backbone.config = _config_with_layers(base.config, None if layer_types is None else layer_types[:n_layers],
                                              n_layers)
        return backbone

    def _head_body(self, base: nn.Module, layer: nn.Module, layer_types: list[str] | None) -> nn.Module:
        """A one-layer base model around ``layer``: no embedding, no dropout on its input, no final norm."""
        a = self.adapter
        for sub in layer.modules():  # the head has its own one-layer KV cache
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = 0  # type: ignore[assignment]  # torch types Module.__setattr__ too narrowly
        embed = cast("PreTrainedModel", base).get_input_embeddings()
        body = copy.copy(base)
        for name, value in list(vars(base).items()):
            if isinstance(value, (dict, set)):
                setattr(body, name, copy.copy(value))
        for name, child in base._modules.items():
            if name == a.layers_attr:
                new: nn.Module | None = nn.ModuleList([layer])
            elif name == a.norm_attr:
                new = nn.Identity()
            elif child is None or child is embed:
                new = None
            elif name == "wpe":  # GPT-2 adds position embeddings to inputs_embeds
                new = _NoPositions()
            elif isinstance(child, nn.Dropout):
                new = nn.Identity()
            elif any(True for _ in child.parameters()):
                raise ValueError(f"{type(base).__name__}.{name} has parameters that a head cannot share; "
                                 "add its handling to mtp_lib.heads.MTPModel._head_body")
            else:  # rotary embeddings and other parameter-free helpers
                new = shallow_module_copy(child)
            body._modules[name] = new
        body.config = _config_with_layers(base.config, layer_types, 1)
        return body

    # -- description -------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """The constructor arguments and the model shape, as saved beside the heads."""
        return {"n_heads": self.n_heads, "head_type": self.head_type, "head_init": self.head_init,
                "weighted_hidden_states": self.weighted_hidden_states, "seed": self.seed,
                "family": self.adapter.family, "n_layers": self.n_layers, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options().items())

    def whs_weights(self) -> torch.Tensor:
        """The WHS mixing weights of every head, [n_heads, L-1] (rows sum to 1)."""
        if not self.weighted_hidden_states:
            raise ValueError("this MTPModel was built with weighted_hidden_states=False")
        # with weighted_hidden_states every head is a LayerHead with a HiddenStateMix
        return torch.stack([cast(HiddenStateMix, cast(LayerHead, head).mix).weights() for head in self.heads])

    # -- forward -----------------------------------------------------------------------------------

    def new_cache(self, *, rollback: bool = False) -> MTPCache:
        """An empty cache. ``rollback=True`` lets sliding-window layers be cropped past their window."""
        from transformers import DynamicCache

        backbone = DynamicCache(config=cast("PreTrainedConfig", self.backbone.config))
        heads = [DynamicCache(config=cast("PreTrainedConfig", h.body.config)) if isinstance(h, LayerHead) else None
                 for h in self.heads]
        cache = MTPCache(backbone, heads, rollback=rollback)
        if rollback:
            for c in [backbone, *heads]:
                if c is not None:
                    c.activate_past_recording()
        return cache

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: MTPCache | None = None,
                use_cache: bool = False, last_only: bool = False,
                logits_positions: slice | torch.Tensor | None = None,
                return_logits: bool = True) -> MTPOutput:
        """Run the backbone once and every head on its output.

        ``input_ids`` [B, T]: the new tokens (after those in ``cache``). ``attention_mask`` [B, past + T]
        (1 = token, 0 = padding) and ``position_ids`` [B, T] as for the HF model; positions default to
        past .. past + T - 1. ``use_cache=True`` returns the updated cache (a new one when ``cache`` is
        None). The heads always run on every position (their caches need it); only the unembedding is
        restricted, to the last position (``last_only``) or to ``logits_positions`` (a slice or an
        index tensor over T), which saves the [n_heads, B, T, V] logits in decoding and training.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if last_only and logits_positions is not None:
            raise ValueError("pass either last_only=True or logits_positions, not both")
        if cache is not None and not use_cache:
            raise ValueError("a cache was given with use_cache=False; pass use_cache=True to extend it")
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            cache.begin()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        whs = self.weighted_hidden_states
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=None if cache is None else cache.backbone, use_cache=use_cache,
                            output_hidden_states=whs)
        hidden: tuple[torch.Tensor, ...] = tuple(out.hidden_states[1:]) if whs else (out.last_hidden_state,)
        if whs and len(hidden) != self.n_layers - 1:
            raise RuntimeError(f"backbone returned {len(hidden)} layer outputs, expected {self.n_layers - 1}")

        keep: slice | torch.Tensor = slice(-1, None) if last_only else (
            slice(None) if logits_positions is None else logits_positions)
        states = []
        if self.head_type == "medusa":
            h = self.final_norm(hidden[-1][:, keep])
            states = [head(h) for head in self.heads]
        else:
            for n, head in enumerate(self.heads):
                z = head(hidden, attention_mask=attention_mask, position_ids=position_ids,
                         cache=None if cache is None else cache.heads[n], use_cache=use_cache)
                states.append(self.final_norm(z[:, keep]))
        stacked = torch.stack(states)
        logits = self.unembed_states(stacked) if return_logits else None
        return MTPOutput(logits=logits, states=stacked, cache=cache if use_cache else None)

    def unembed_states(self, states: torch.Tensor) -> torch.Tensor:
        """Logits from normed head outputs: the shared unembedding and any final soft-capping."""
        logits = self.unembed(states)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- saving ------------------------------------------------------------------------------------

    def save_heads(self, path: str | Path) -> Path:
        """Save the heads alone (their weights and WHS weights, not the backbone) as safetensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(tensors, str(path), metadata={"mtp_options": json.dumps(self.options())})
        return path

    def load_heads(self, path: str | Path) -> None:
        """Load heads saved by :meth:`save_heads` into this model (same options and model shape)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path={str(path)!r} is not a file saved by MTPModel.save_heads")
        with safe_open(str(path), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("mtp_options", "{}"))
        mine = self.options()
        differ = {k: (saved.get(k), v) for k, v in mine.items() if k != "seed" and saved.get(k) != v}
        if differ:
            raise ValueError(f"heads in {path.name} do not fit this MTPModel: (saved, here) = {differ}")
        ref = next(self.backbone.parameters())
        state = {k: v.to(ref.device) for k, v in load_file(str(path)).items()}
        self.heads.load_state_dict(state, strict=True)

    @classmethod
    def from_saved(cls, model: nn.Module, path: str | Path) -> MTPModel:
        """Build an MTPModel on ``model`` with the options stored in ``path`` and load the heads."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise ValueError(f"path={str(path)!r} is not a file saved by MTPModel.save_heads")
        with safe_open(str(path), framework="pt") as f:
            opts = json.loads((f.metadata() or {}).get("mtp_options", "{}"))
        if not opts:
            raise ValueError(f"{Path(path).name} has no MTP options in its metadata: not saved by save_heads")
        mtp = cls(model, n_heads=opts["n_heads"], weighted_hidden_states=opts["weighted_hidden_states"],
                  head_type=opts["head_type"], seed=opts.get("seed", 0), head_init=opts.get("head_init", "random"))
        mtp.load_heads(path)
        return mtp
