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
