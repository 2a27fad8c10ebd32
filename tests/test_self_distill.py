"""mtp_lib.self_distill on tiny float64 models: the targets are the model's greedy output, and the
trained draft heads decode the model itself (head 1 reset), token for token."""

from __future__ import annotations

import pytest
import torch

from mtp_lib.data import Sample
from mtp_lib.decode import greedy_generate, speculative_generate
from mtp_lib.heads import MTPModel
from mtp_lib.models import get_adapter
from mtp_lib.self_distill import greedy_targets, model_as_verifier, train_draft_heads
from mtp_lib.train import add_lora
from seeds import fresh_seed
from test_decode import tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_draft_heads_are_trained_on_the_models_greedy_output_and_decode_the_model_itself(family: str) -> None:
    seed = fresh_seed()
    model = tiny(family, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (7,), generator=g)]
    samples = [Sample(f"s{i}", "translation", p + [1, 2, 3], len(p), "") for i, p in enumerate(prompts)]
    data = greedy_targets(model, samples, 6, batch=3, progress=False)  # left-padded batches of 3
    reference = MTPModel(model, n_heads=1)
    for s, p in zip(data, prompts):
        assert s.input_ids[:s.target_start] == p, seed
        assert s.input_ids[s.target_start:] == greedy_generate(reference, torch.tensor([p]), 6).new_token_ids, seed

    mtp, record = train_draft_heads(model, data, 3, epochs=2, batch=4, lr=1e-2, seed=seed, progress=False)
    assert record["sequences"] == 7 and record["steps"] == 2 * (7 // 4) and record["config"]["n_heads"] == 3
    adapter = get_adapter(model)
    head1 = getattr(mtp.heads[0].body, adapter.layers_attr)[0].state_dict()
    last = adapter.layers(model)[-1].state_dict()
    assert all(torch.equal(head1[k], last[k]) for k in last), seed  # head 1 is the model's last layer again
    for p in prompts[:3]:
        ids = torch.tensor([p])
        assert speculative_generate(mtp, ids, 16).new_token_ids == greedy_generate(reference, ids, 16).new_token_ids

    kept, _ = train_draft_heads(model, data, 3, epochs=2, batch=4, lr=1e-2, seed=seed, keep_head1=True,
                                progress=False)
    trained = getattr(kept.heads[0].body, adapter.layers_attr)[0].state_dict()
    assert not all(torch.equal(trained[k], last[k]) for k in last), seed  # training moved head 1


def test_a_verifier_must_be_the_model_itself() -> None:
    seed = fresh_seed()
    model = tiny("llama", seed)
    with pytest.raises(ValueError, match="weighted hidden states"):
        model_as_verifier(MTPModel(model, n_heads=2, weighted_hidden_states=True), model)
    joint = MTPModel(model, n_heads=2)
    add_lora(joint.backbone, get_adapter(model).lora_targets, seed=seed)
    with pytest.raises(ValueError, match="LoRA"):
        model_as_verifier(joint, model)
    medusa = MTPModel(model, n_heads=2, head_type="medusa")
    assert model_as_verifier(medusa, model) is medusa and not medusa.training
    with pytest.raises(ValueError, match="n_tokens"):
        greedy_targets(model, [], 0)
    with pytest.raises(ValueError, match="data is empty"):
        train_draft_heads(model, [], 2)
