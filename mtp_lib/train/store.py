"""What a run writes to ``out_dir``: its checkpoint, fingerprinted so that only the same run resumes
it, and the trained weights (:func:`save_trained`, :func:`load_trained`).

A run's fingerprint names everything its weights depend on: the training config, the model (class,
name, architecture config), a digest of the model's starting weights, and digests of the training
and evaluation samples (their token ids and target starts, in order). A checkpoint whose fingerprint
differs from the run asking to resume it is refused, saying what differs; ``train(...,
resume=False)`` starts over instead.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_lib.train.batches import TrainSample
from mtp_lib.train.config import TrainConfig
from mtp_lib.train.lora import merge_lora
from mtp_lib.train.objective import build_net, trainable_state

__all__ = ["CHECKPOINT", "RESULT_FILES", "fingerprint", "load_trained", "read_checkpoint", "save_trained",
           "write_checkpoint"]

CHECKPOINT = "checkpoint.pt"
RESULT_FILES = ("trained.safetensors", "config.json", "history.json")
_FRESH = ("pass resume=False to start over in this out_dir (its checkpoint and results are replaced), or "
          "choose another out_dir")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def samples_digest(samples: Sequence[TrainSample] | None) -> dict[str, Any]:
    """How many samples and a digest of their token ids and target starts, in order."""
    h = hashlib.sha256()
    for s in samples or []:
        ids = list(s.input_ids)
        h.update(struct.pack("<qq", len(ids), int(s.target_start)))
        h.update(array.array("q", ids).tobytes())
    return {"n": len(samples or []), "sha256": h.hexdigest()[:16]}


def model_description(model: nn.Module) -> dict[str, str]:
    """Class, name and a digest of the architecture config (without its bookkeeping fields). The name
    (the last part of the config's ``_name_or_path``: a hub id's model name, or a folder's name) is
    for messages only: the same model loaded from another folder is the same model."""
    config = getattr(model, "config", None)
    fields = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    kept = {k: v for k, v in fields.items() if not k.startswith("_") and k != "transformers_version"}
    return {"class": type(model).__name__, "name": Path(str(fields.get("_name_or_path") or "")).name,
            "config_sha256": _sha(json.dumps(kept, sort_keys=True, default=str).encode())}


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer of ``model``: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, samples: Sequence[TrainSample], config: TrainConfig,
                eval_samples: Sequence[TrainSample] | None = None) -> dict[str, Any]:
    """What a run's weights and history depend on (see the module docstring)."""
    return {"config": config.to_dict(), "model": model_description(model), "weights": weights_digest(model),
            "samples": samples_digest(samples), "eval_samples": samples_digest(eval_samples)}


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    try:
        there = dataclasses.asdict(TrainConfig.from_dict(saved))
    except (TypeError, ValueError) as err:
        return [f"its training config is not one this version reads ({err})"]
    here = dataclasses.asdict(TrainConfig.from_dict(current))
    return [f"the training config's {k} ({there[k]!r} there, {here[k]!r} here)" for k in here if there[k] != here[k]]


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and the current run's, in words."""
    out = []
    for key, what in [("samples", "the training samples"), ("eval_samples", "the evaluation samples")]:
        a, b = saved.get(key), current[key]
        if a != b:
            a = a or {"n": "?", "sha256": "?"}
            out.append(f"{what} ({a['n']} with digest {a['sha256']} there, {b['n']} with digest {b['sha256']} here)")
    a, b = saved.get("model") or {}, current["model"]
    if (a.get("class"), a.get("config_sha256")) != (b["class"], b["config_sha256"]):
        out.append(f"the model ({a.get('class')} {a.get('name')!r} with config digest {a.get('config_sha256')} "
                   f"there, {b['class']} {b['name']!r} with config digest {b['config_sha256']} here)")
    elif saved.get("weights") != current["weights"]:
        out.append("the model's starting weights (same architecture, other values or dtype)")
    return out + _config_differences(saved.get("config") or {}, current["config"])


def read_checkpoint(path: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, if it was written by the run whose fingerprint is ``current``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file of anything else: pickle, zip or torch errors
        raise ValueError(f"{path} is not a checkpoint of mtp_lib.train ({type(err).__name__}); {_FRESH}") from err
    if not isinstance(saved, dict) or not {"phase", "step", "history", "trainable"} <= set(saved):
        raise ValueError(f"{path} is not a checkpoint of mtp_lib.train; {_FRESH}")
    if "fingerprint" not in saved:
        raise ValueError(f"{path} was written by an older mtp_lib.train that did not record the samples and "
                         f"model it trained on, so resuming it could mix two runs; {_FRESH}")
    found = differences(saved["fingerprint"], current)
    if found:
        raise ValueError(f"{path} belongs to another run; it differs from this one in " + "; ".join(found)
                         + f". To resume it, call train with what it was made with; else {_FRESH}")
    return saved


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` to ``path`` atomically (a killed write leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_trainable(net: nn.Module, saved: dict[str, torch.Tensor], path: Path, hint: str = _FRESH) -> None:
    """Copy saved trained weights (heads, LoRA) into ``net``; names and shapes must match."""
    params = dict(net.named_parameters())
    mine = set(trainable_state(net))
    if set(saved) != mine:
        raise ValueError(f"{path}'s trained weights do not fit this model (another family or shape; names "
                         f"differ: {sorted(set(saved) ^ mine)[:4]}); {hint}")
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(params[name].shape)}; {hint}")
            params[name].copy_(value)


def save_trained(net: nn.Module, config: TrainConfig, out_dir: str | Path, *,
                 history: list[dict[str, Any]] | None = None) -> Path:
    """Write what training changed (heads and LoRA weights, safetensors) and the config to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(net).items()}
    save_file(tensors, str(out / "trained.safetensors"), metadata={"config": json.dumps(config.to_dict())})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history))
    return out


def load_trained(model: nn.Module, out_dir: str | Path) -> nn.Module:
    """Rebuild a trained result on a fresh ``model``: the :class:`MTPModel`, or the merged NTP model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(out_dir) / "trained.safetensors"
    if not path.is_file():
        raise ValueError(f"out_dir={str(out_dir)!r} holds no trained.safetensors (written by train/save_trained)")
    with safe_open(str(path), framework="pt") as f:
        config = TrainConfig.from_dict(json.loads((f.metadata() or {})["config"]))
    net = build_net(model, config)
    restore_trainable(net, load_file(str(path)), path, "load it on the model it was trained on")
    for p in net.parameters():
        p.requires_grad_(False)
    return merge_lora(net) if config.objective == "ntp" else net.eval()
