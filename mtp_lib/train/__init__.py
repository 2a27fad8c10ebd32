"""Train MTP heads (and the NTP baseline) the paper's ways: one configurable trainer.

The recipes of the paper's Table 1 are named presets of :class:`TrainConfig` in :data:`RECIPES`:

============================  ====================================================================
``heads_only``                heads trained on a frozen backbone
``vanilla_joint``             heads + LoRA (rank 8) on the backbone's attention q/k/v
``head_warmup``               1 epoch heads only, then 1 epoch joint
``diff_lr``                   joint, heads at 4x the base learning rate
``head_warmup_diff_lr``       both of the above
``diff_lr_whs``               joint, 4x head LR, weighted hidden states
``medusa``                    Medusa-1 heads (residual blocks) on a frozen model (not in the paper)
``ntp_baseline``              the model itself LoRA-fine-tuned on next-token loss (the baseline row;
                              MTP then comes from :mod:`mtp_lib.marginal`)
============================  ====================================================================

Common to all (the paper's Section 3): cross-entropy on target tokens only, AdamW (weight decay
0.01), cosine annealing, an effective batch of 64 sequences by gradient accumulation, bf16 autocast
on GPU; joint phases rescale each head's loss per batch so its RMS matches head 1's. The learning
rate is a config value (the paper: half the model's pretraining LR, see :data:`PAPER_LR`).

Choices the paper leaves open, made here (all config values): LoRA alpha 16, no LoRA dropout;
gradient clipping at norm 1 (the Hugging Face Trainer's default); no weight decay on 1-D parameters
(biases, norms, WHS weights); heads keep their multiplied LR in a warmup phase too; the network
trains in training mode, so dropout applies where the architecture has it (the paper's models have
none), from seeded generators; loss RMS is taken over a micro-batch's target tokens; an epoch drops
its last incomplete batch of 64.

The trainer never changes the given model: heads, LoRA and the baseline's merged weights are new
tensors; the backbone shares the frozen weights (see :mod:`mtp_lib.heads`). It runs unchanged under
``accelerate launch`` on several GPUs (data parallel), checkpoints every ``checkpoint_every``
optimizer steps and resumes from the last checkpoint, giving the same result as an uninterrupted
run; a checkpoint is resumed only by the run that wrote it (same config, model, starting weights and
samples), anything else is refused with what differs. Samples are any objects with ``input_ids``
(list of ints) and ``target_start`` (index of the first target token), e.g.
:class:`mtp_lib.data.Sample`.

The package's modules: ``config`` (the config, recipes, phases), ``batches`` (samples to padded or
packed batches and labels), ``lora`` (adapters on shared modules, merging), ``objective`` (the trained
network and its per-head loss), ``scoring`` (top-k hits, held-out losses), ``steps`` (optimizer,
schedule, batch order, dropout seeds), ``store`` (checkpoints, fingerprints, saved results),
``loop`` (:func:`train`).

Example (a short CPU run)::

    lm = load_model("smollm2-135m")
    train_set = translation_samples(lm.tokenizer, 256, split="train")
    eval_set = translation_samples(lm.tokenizer, 50, split="validation")
    config = recipe("diff_lr", lr=1e-4, effective_batch_size=8, micro_batch_size=4, max_steps=30)
    result = train(lm.model, train_set, config, eval_samples=eval_set, out_dir="runs/diff_lr")
    accuracy(evaluate(result.model, eval_set))   # top-5 accuracy of head 1, head 2
    tuned = train(lm.model, train_set, recipe("ntp_baseline", ...)).model   # a plain HF model
"""

from mtp_lib.train.batches import IGNORE, Batch, TrainSample, collate, pack
from mtp_lib.train.config import PAPER_LR, RECIPES, TrainConfig, recipe
from mtp_lib.train.lora import add_lora, merge_lora
from mtp_lib.train.loop import TrainResult, compile_layers, train
from mtp_lib.train.objective import Objective as _Objective
from mtp_lib.train.objective import balance_losses
from mtp_lib.train.scoring import accuracy, evaluate
from mtp_lib.train.store import load_trained, save_trained

__all__ = [
    "IGNORE",
    "PAPER_LR",
    "RECIPES",
    "Batch",
    "TrainConfig",
    "TrainResult",
    "TrainSample",
    "accuracy",
    "add_lora",
    "balance_losses",
    "collate",
    "compile_layers",
    "evaluate",
    "load_trained",
    "merge_lora",
    "pack",
    "recipe",
    "save_trained",
    "train",
]
