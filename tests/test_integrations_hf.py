"""Hugging Face models: the Fisher of BERT and GPT-2 (tiny configs, no download) against a
batch-size-1 loop, from the dict batches a collator makes.

The batches carry ``labels`` (the targets) and keyword inputs, among them ``position_ids`` of
shape ``(1, T)`` shared by the batch: the position table's per-sample gradient is the per-sample
sum over positions, which a rule that saw the table's ``(1, T, D)`` output would get as the batch
sum (about B times too large in the squares).
"""

from __future__ import annotations

import pytest
import torch

import cl_optim

transformers = pytest.importorskip("transformers", reason="the integrations extra installs transformers")

VOCAB, T, CLASSES = 40, 6, 3


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=CLASSES,
                                     attn_implementation="eager")  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     num_labels=CLASSES, pad_token_id=0, attn_implementation="eager")  # fmt: skip
    return transformers.GPT2ForSequenceClassification(config)


def _batches(sizes, with_positions):
    gen = torch.Generator().manual_seed(0)
    out = []
    for b in sizes:
        batch = {
            "input_ids": torch.randint(1, VOCAB, (b, T), generator=gen),
            "attention_mask": torch.ones(b, T, dtype=torch.long),
            "labels": torch.randint(0, CLASSES, (b,), generator=gen),
        }
        if with_positions:
            batch["position_ids"] = torch.arange(T).unsqueeze(0)  # (1, T): shared by the batch
        out.append(batch)
    return out


def _loop_fisher(model, batches, estimator):
    """The definition, one sample at a time: mean over samples of squared per-sample gradients."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in batches:
        size = batch["labels"].shape[0]
        for i in range(size):
            inputs = {
                k: (v if k == "position_ids" else v[i : i + 1]) for k, v in batch.items() if k != "labels"
            }
            log_probs = torch.log_softmax(model(**inputs).logits[0].float(), dim=0)
            classes = [int(batch["labels"][i])] if estimator == "empirical" else range(CLASSES)
            for c in classes:
                grads = torch.autograd.grad(
                    log_probs[c], list(params.values()), retain_graph=True, allow_unused=True
                )
                weight = 1.0 if estimator == "empirical" else float(log_probs[c].detach().exp())
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        totals[name] += weight * g.square()
            count += 1
    return {n: t / count for n, t in totals.items()}


@pytest.mark.parametrize("estimator", ["empirical", "exact"])
@pytest.mark.parametrize("with_positions", [True, False], ids=["position_ids_1xT", "default_positions"])
@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_the_fisher_of_a_hugging_face_model_matches_a_batch_size_1_loop(make, with_positions, estimator):
    torch.manual_seed(0)
    model = make()
    batches = _batches([5, 3], with_positions)
    fisher = cl_optim.fisher.estimate(model, batches, estimator=estimator)
    reference = _loop_fisher(model, batches, estimator)
    assert fisher.meta["samples"] == 8
    assert set(fisher) == set(reference)
    for name, want in reference.items():
        torch.testing.assert_close(
            fisher[name], want, rtol=1e-4, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}"
        )
    # the position table got its own, non-zero importance
    positions = [n for n in fisher if "position" in n or n.endswith("wpe.weight")]
    assert positions and all(float(fisher[n].sum()) > 0 for n in positions)


def test_n_samples_cuts_every_tensor_of_a_dict_batch():
    torch.manual_seed(0)
    model = _bert()
    batches = _batches([5, 5], with_positions=True)
    fisher = cl_optim.fisher.estimate(model, batches, estimator="empirical", n_samples=7)
    assert fisher.meta["samples"] == 7
    cut = [batches[0], {k: (v if k == "position_ids" else v[:2]) for k, v in batches[1].items()}]
    reference = _loop_fisher(model, cut, "empirical")
    for name, want in reference.items():
        torch.testing.assert_close(fisher[name], want, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------- ContinualTrainer


def _quiet_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=CLASSES,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _dataset(n=16):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def _trainer(model, opt, tmp_path, ewc=None, **args):
    from torch.utils.data import SequentialSampler

    from cl_optim.integrations.huggingface import ContinualTrainer

    class InOrder(ContinualTrainer):  # the reference loop below takes the samples in order
        def _get_train_sampler(self, *_, **__):
            return SequentialSampler(self.train_dataset)

    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.05, max_grad_norm=0.0,
        report_to=[], use_cpu=True, logging_strategy="no", **{"save_strategy": "no", **args},
    )  # fmt: skip
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = InOrder(
        model=model, args=arguments, train_dataset=_dataset(), optimizers=(opt, constant), ewc=ewc
    )
    # BERT takes loss keyword arguments but averages each micro-batch by itself, so the Trainer
    # would sum the micro-batch means; told otherwise, it divides by the accumulation steps (the
    # mean over the window, which the reference loop computes).
    trainer.model_accepts_loss_kwargs = False
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_continual_trainer_makes_sams_two_passes_with_gradient_accumulation(tmp_path, accumulation):
    """Three optimisation steps of SAM(SGD) through the Trainer equal the hand-written loop: pass 1
    accumulated over the micro-batches, first_step, pass 2 over the same micro-batches, update."""
    model, reference = _quiet_bert(), _quiet_bert()
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    _trainer(model, opt, tmp_path, gradient_accumulation_steps=accumulation, max_steps=3).train()
    assert opt.steps == 3

    ref_opt = cl_optim.SAM(reference.parameters(), cl_optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
    data = _dataset()
    micro = [data[i : i + 4] for i in range(0, 16, 4)]
    for step in range(3):
        batches = [micro[(step * accumulation + k) % len(micro)] for k in range(accumulation)]
        stacked = [{key: torch.stack([s[key] for s in b]) for key in b[0]} for b in batches]
        for b in stacked:
            (reference(**b).loss / accumulation).backward()
        ref_opt.first_step(zero_grad=True)
        for b in stacked:
            (reference(**b).loss / accumulation).backward()
        ref_opt.second_step(zero_grad=True)
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_continual_trainer_keeps_ewc_in_its_checkpoints(tmp_path):
    from cl_optim.integrations.huggingface import EWC_CHECKPOINT

    model = _quiet_bert()
    ewc = cl_optim.EWC(model, lam=10.0)
    ewc.consolidate({n: torch.rand_like(p) for n, p in model.named_parameters()})
    opt = cl_optim.AdamW(model.parameters(), lr=1e-3, ewc=ewc)
    _trainer(model, opt, tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / EWC_CHECKPOINT).exists()

    # A fresh process resumes: a new EWC (no tasks yet) gets the checkpoint's importance back.
    resumed_model = _quiet_bert()
    fresh = cl_optim.EWC(resumed_model, lam=10.0)
    resumed_opt = cl_optim.AdamW(resumed_model.parameters(), lr=1e-3, ewc=fresh)
    _trainer(resumed_model, resumed_opt, tmp_path / "resumed", max_steps=3).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert fresh.tasks == 1
    for name in ewc.names:
        torch.testing.assert_close(fresh._entries[name].precision, ewc._entries[name].precision)
