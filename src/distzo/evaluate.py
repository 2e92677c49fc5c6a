"""Evaluation: candidate accuracy, generation F1/EM, and mean loss.

Classification follows MeZO: each candidate is scored by the mean log-probability of its
tokens after the prompt and the best-scoring one is the prediction. Generation decodes
greedily and scores the first line against every acceptable answer with SQuAD's F1 and
exact match. LM and SFT tasks report the mean token loss.

    evaluate(model, tokenizer, task, examples)                       # one process
    evaluate(model, tokenizer, task, examples, "auto", mesh=mesh)    # every rank its share

Every metric is computed from a table with one row per example (a hit; an F1 and an EM; a
token NLL sum and a token count). Under torchrun each rank fills the rows of its share (every
world-th example) and one float64 all-reduce hands every rank the whole table, which it then
reduces in example order: the metrics are the one-process metrics, to the bit where the rows
are (hits, F1, EM), and to float tolerance for losses.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from distzo.losses import IGNORE_INDEX, candidate_scores, token_nll
from distzo.tasks.base import Example, Task
from distzo.tasks.collate import collate_classification, collate_prompts, collate_train, pad_id

if TYPE_CHECKING:
    from distzo.parallel import Mesh

AUTO = "auto"
# The per-example columns each task kind's metrics are computed from.
COLUMNS = {"classification": ("hit",), "generation": ("f1", "em"), "lm": ("nll", "tokens")}
# Examples per forward when the caller names no batch size.
DEFAULT_BATCH = {"classification": 32, "generation": 8, "lm": 16}
# "auto" off the GPU: CPU kernels gain little from larger batches, and padding costs like real tokens.
CPU_BATCH = 16
# Share of the free GPU memory "auto" plans for: the per-example figure is an estimate of the
# largest tensors only, and the caching allocator fragments.
MEMORY_SHARE = 0.5
# ... stretched to this share when that saves a pass over the examples: under offload a pass
# uploads the whole model (per generated token, for generation), so 100 prompts in batches of
# 96 + 4 take twice the time of one batch of 100.
STRETCH_SHARE = 0.6


def evaluate(
    model,
    tokenizer,
    task: Task | str,
    examples: Sequence[Example],
    batch_size: int | str | None = None,
    max_length: int = 256,
    max_new_tokens: int = 50,
    mesh: Mesh | None = None,
    lockstep: bool = False,
) -> dict[str, float]:
    """The task's metric on ``examples``: {"accuracy"}, {"f1", "em"} or {"loss"}, by the task's kind.

    ``batch_size`` counts examples per forward: an int, "auto" (``auto_batch_size``) or None
    (the kind's default). With a distributed ``mesh`` each rank scores every world-th example.
    ``lockstep`` is for models whose every forward is collective (sliced offload): all ranks then
    agree on the batch size and score equally many examples, the short shares padded with repeats
    of example 0 whose rows are dropped, so they run the same forwards.
    """
    kind = task if isinstance(task, str) else task.kind
    if kind not in COLUMNS:
        raise ValueError(f"unknown task kind {kind!r}")
    _check_answers(kind, examples)  # on every rank alike, before any rank starts scoring
    rank, world = (mesh.rank, mesh.world_size) if mesh is not None and mesh.distributed else (0, 1)
    mine, real = shard(len(examples), rank, world, pad=lockstep)
    share = [examples[i] for i in mine]
    size = resolve_batch_size(batch_size, kind, model, tokenizer, share, max_length, max_new_tokens)
    synced = lockstep and world > 1
    if synced:
        size = _agreed_minimum(mesh, size)
    rows = example_rows(kind, model, tokenizer, share, size, max_length, max_new_tokens, synced)
    table = torch.zeros(len(examples), len(COLUMNS[kind]), dtype=torch.float64)
    table[mine[:real]] = rows[:real]
    if world > 1:
        # Each row is filled by one rank and zero on the others: the sum is the table itself.
        table = mesh.all_reduce_sum(table)
    return metrics_of(kind, table)


def shard(count: int, rank: int, world: int, pad: bool = False) -> tuple[list[int], int]:
    """(this rank's example indices, how many of them are real): every ``world``-th from ``rank``.

    With ``pad`` every rank gets ceil(count / world) indices, the missing ones repeats of 0.
    """
    mine = list(range(rank, count, world))
    real = len(mine)
    if pad:
        mine += [0] * (-(-count // world) - real)
    return mine, real


def metrics_of(kind: str, table: torch.Tensor) -> dict[str, float]:
    """A kind's metrics from its per-example table; the sums are exactly rounded (fsum), so they
    depend on the rows alone, not on how the rows were batched or sharded."""
    sums = [math.fsum(column) for column in table.T.tolist()]
    n = max(table.shape[0], 1)
    if kind == "classification":
        return {"accuracy": sums[0] / n}
    if kind == "generation":
        return {"f1": sums[0] / n, "em": sums[1] / n}
    if sums[1] == 0:
        raise ValueError("no target tokens to compute a loss on")
    return {"loss": sums[0] / sums[1]}


def example_rows(
    kind: str,
    model,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int = 256,
    max_new_tokens: int = 50,
    synced: bool = False,
) -> torch.Tensor:
    """(examples, columns) float64: what each example adds to its kind's metrics (``COLUMNS``)."""
    if kind == "classification":
        scores = score_candidates(model, tokenizer, examples, batch_size, max_length)
        hits = [float(int(s.argmax()) == e.gold) for s, e in zip(scores, examples)]
        return torch.tensor(hits, dtype=torch.float64).reshape(-1, 1)
    if kind == "generation":
        predictions = generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, synced=synced)
        scores = [(max(f1_score(p, a) for a in e.answers), max(exact_match(p, a) for a in e.answers))
                  for p, e in zip(predictions, examples)]
        return torch.tensor(scores, dtype=torch.float64).reshape(-1, 2)
    return token_losses(model, tokenizer, examples, batch_size, max_length)


def _check_answers(kind: str, examples: Sequence[Example]) -> None:
    if kind == "classification" and any(e.gold is None for e in examples):
        raise ValueError("accuracy needs a gold candidate on every example")
    if kind == "generation" and any(not e.answers for e in examples):
        raise ValueError("generation scores need at least one answer on every example")


@torch.no_grad()
def accuracy(model, tokenizer, examples: Sequence[Example], batch_size: int = 32, max_length: int = 256) -> float:
    """Share of examples whose gold candidate scores highest; ``batch_size`` counts examples."""
    _check_answers("classification", examples)
    rows = example_rows("classification", model, tokenizer, examples, batch_size, max_length)
    return metrics_of("classification", rows)["accuracy"]


@torch.no_grad()
def score_candidates(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 32, max_length: int = 256
) -> list[torch.Tensor]:
    """Each example's candidate scores (mean token log-probability), one forward per batch.

    Where every candidate of a batch is a single token, a batch has one row per example
    and the model computes the vocabulary projection for the last position only.
    Otherwise there is a row per candidate, left-padded so all candidates end at the
    last position, and a model that takes ``logits_to_keep`` projects only the last
    few positions instead of producing (rows, length, vocab) logits.
    """
    out: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    with eval_mode(model):
        for chunk in batches(by_length(examples), batch_size):
            batch = collate_classification([examples[i] for i in chunk], tokenizer, max_length, fallback_side="left")
            shared = "candidate_ids" in batch
            keep = batch["logits_to_keep"] if shared else _answer_span(batch["labels"])
            logits = forward_logits(model, batch, keep_last=keep)
            scores = candidate_scores(logits, batch).cpu()
            for i, row, n in zip(chunk, scores, batch["num_candidates"].tolist()):
                out[i] = row[:n]
    return out


@torch.no_grad()
def generation_scores(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    max_length: int = 256,
    stop: str = "\n",
) -> dict[str, float]:
    """Mean best-over-answers F1 and exact match of greedy generations, cut at ``stop``."""
    _check_answers("generation", examples)
    predictions = generate(model, tokenizer, examples, max_new_tokens, batch_size, max_length, stop)
    rows = [(max(f1_score(p, a) for a in e.answers), max(exact_match(p, a) for a in e.answers))
            for p, e in zip(predictions, examples)]
    return metrics_of("generation", torch.tensor(rows, dtype=torch.float64).reshape(-1, 2))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    max_length: int = 256,
    stop: str | None = "\n",
    synced: bool = False,
) -> list[str]:
    """Greedy continuations of the prompts (left-padded, so new tokens line up), cut at ``stop``.

    A batch decodes together with a KV cache, whatever the model's ``use_cache`` says (distzo
    turns it off for training): each step is one forward of one new token per prompt, so an
    offloaded block comes up once per step for the whole batch. ``synced``: every rank keeps
    stepping until all ranks' batches are done (every forward is collective in sliced offload).
    """
    if max_length <= max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and {max_new_tokens} new tokens")
    device = model_device(model)
    texts: list[str] = [""] * len(examples)
    with eval_mode(model):
        for chunk in batches(by_length(examples), batch_size):
            batch = collate_prompts([examples[i] for i in chunk], tokenizer, max_length - max_new_tokens)
            ids = batch["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id(tokenizer),
                use_cache=True,
                **({"synced_gpus": True} if synced else {}),
            )
            for i, text in zip(chunk, tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)):
                texts[i] = text
    return [(t.split(stop)[0] if stop else t).strip() for t in texts]


@torch.no_grad()
def mean_loss(model, tokenizer, examples: Sequence[Example], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean NLL per target token over all examples (a long example weighs by its tokens)."""
    return metrics_of("lm", token_losses(model, tokenizer, examples, batch_size, max_length))["loss"]


@torch.no_grad()
def token_losses(model, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                 max_length: int = 256) -> torch.Tensor:
    """(examples, 2) float64: each example's summed target-token NLL and its number of target tokens."""
    out = torch.zeros(len(examples), 2, dtype=torch.float64)
    with eval_mode(model):
        for chunk in batches(by_length(examples), batch_size):
            batch = collate_train([examples[i] for i in chunk], tokenizer, "lm", max_length)
            nll, rows = token_nll(forward_logits(model, batch), batch["labels"])
            rows = rows.cpu()
            index = torch.tensor(chunk, dtype=torch.long)
            out[:, 0].index_add_(0, index[rows], nll.double().cpu())
            out[:, 1].index_add_(0, index[rows], torch.ones(len(rows), dtype=torch.float64))
    return out


def forward_logits(model, batch: dict[str, torch.Tensor], keep_last: int | None = None) -> torch.Tensor:
    """The model's logits for a batch; only the last ``keep_last`` positions where the model allows it.

    Position ids are passed from the attention mask so left padding does not shift the
    positions of real tokens.
    """
    device = model_device(model)
    mask = batch["attention_mask"].to(device)
    kwargs = {"input_ids": batch["input_ids"].to(device), "attention_mask": mask}
    accepted = inspect.signature(model.forward).parameters
    if "position_ids" in accepted:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    if keep_last is not None and "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep_last
    return model(**kwargs).logits


def _answer_span(labels: torch.Tensor) -> int:
    """Positions whose logits the loss reads: from the one before the first label column to the end."""
    columns = (labels != IGNORE_INDEX).any(0).nonzero()
    if columns.numel() == 0:
        return labels.shape[1]
    return labels.shape[1] - max(int(columns[0]) - 1, 0)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def by_length(examples: Sequence[Example]) -> list[int]:
    """Example indices, shortest text first: a batch of similar lengths pads less (padding is
    computed like real tokens); callers hand the results back in the examples' order."""
    return sorted(range(len(examples)), key=lambda i: _text_length(examples[i]))


def _text_length(e: Example) -> int:
    return len(e.prompt) + len(e.target or "") + sum(len(m.get("content") or "") for m in e.messages)


def model_device(model) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- batch size


def check_batch_size(value: int | str, where: str = "batch_size") -> int | str:
    """``value`` if it is a positive int or "auto", else ValueError."""
    if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"{where} must be a positive integer or {AUTO}, got {value!r}")


def resolve_batch_size(batch_size: int | str | None, kind: str, model, tokenizer, examples: Sequence[Example],
                       max_length: int = 256, max_new_tokens: int = 50) -> int:
    """Examples per forward: ``batch_size`` itself, the kind's default for None, or for "auto"
    ``auto_batch_size``."""
    if batch_size is None:
        return DEFAULT_BATCH[kind]
    if check_batch_size(batch_size) == AUTO:
        return auto_batch_size(model, tokenizer, kind, examples, max_length, max_new_tokens)
    return int(batch_size)


def auto_batch_size(model, tokenizer, kind: str, examples: Sequence[Example], max_length: int = 256,
                    max_new_tokens: int = 50) -> int:
    """As many examples per forward as ``MEMORY_SHARE`` of the free GPU memory holds, by an
    estimate of an example's largest tensors (``bytes_per_example``); ``CPU_BATCH`` off the GPU.

    Memory the caching allocator holds but no tensor uses counts as free. Under offload the
    engine's slots are allocated already, so what is left is the batch's.
    """
    device = model_device(model)
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_example = bytes_per_example(model, tokenizer, kind, examples, max_length, max_new_tokens)
    n = max(len(examples), 1)
    planned = max(1, min(int(free * MEMORY_SHARE // per_example), n))
    return fewest_passes(n, planned, max(1, int(free * STRETCH_SHARE // per_example)))


def fewest_passes(n: int, planned: int, stretched: int) -> int:
    """The batch size for ``n`` examples: the fewest passes that batches of ``planned`` (or, when
    that saves a pass, of ``stretched``) take, in batches as equal as they can be."""
    passes = min(-(-n // planned), -(-n // min(stretched, n)))
    return -(-n // passes)


def bytes_per_example(model, tokenizer, kind: str, examples: Sequence[Example], max_length: int = 256,
                      max_new_tokens: int = 50) -> int:
    """An upper estimate of the memory one example adds to an eval forward (no autograd graph):
    one block's activations at a time, the logits and their float32 copies, and for generation the
    KV cache of every layer."""
    shape = _ModelShape.of(model)
    rows, length, kept = _rows_and_lengths(kind, tokenizer, examples, max_length, max_new_tokens)
    size = shape.itemsize
    activations = length * (4 * shape.hidden + 2 * shape.intermediate) * size + shape.heads * length**2 * size
    logits = kept * shape.vocab * (size + 8)  # the logits, a float32 copy and its log-softmax
    cache = 2 * shape.layers * length * shape.kv_dim * size if kind == "generation" else 0
    return rows * (activations + logits + cache)


def _rows_and_lengths(kind: str, tokenizer, examples: Sequence[Example], max_length: int,
                      max_new_tokens: int) -> tuple[int, int, int]:
    """(rows per example, the longest row, positions whose logits a row keeps)."""
    if any(e.messages for e in examples) or not examples:
        return 1, max_length, max_length
    prompt = _longest(tokenizer, [e.prompt for e in examples]) + 1  # a BOS token, perhaps
    if kind == "classification":
        answer = _longest(tokenizer, [c for e in examples for c in e.candidates])
        rows = 1 if answer == 1 else max(len(e.candidates) for e in examples)
        return rows, min(prompt + answer, max_length), answer + 1
    if kind == "generation":
        return 1, min(prompt, max_length - max_new_tokens) + max_new_tokens, 1
    length = min(prompt + _longest(tokenizer, [e.target or "" for e in examples]) + 1, max_length)
    return 1, length, length


def _longest(tokenizer, texts: list[str]) -> int:
    texts = [t for t in texts if t]
    if not texts:
        return 0
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _ModelShape:
    """The sizes of a causal LM that its eval memory scales with, read from its config
    (the names differ by family; a model without a config gets a 7B-like guess)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    itemsize: int

    @classmethod
    def of(cls, model) -> _ModelShape:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = _field(config, ("hidden_size", "n_embd", "d_model"), 4096)
        heads = _field(config, ("num_attention_heads", "n_head"), 32)
        kv_heads = _field(config, ("num_key_value_heads",), heads)
        param = next(iter(model.parameters()), None)
        return cls(
            hidden=hidden,
            intermediate=_field(config, ("intermediate_size", "ffn_dim", "n_inner"), 4 * hidden),
            layers=_field(config, ("num_hidden_layers", "n_layer"), 32),
            heads=heads,
            kv_dim=hidden * kv_heads // max(heads, 1),
            vocab=_field(config, ("vocab_size",), 32000),
            itemsize=param.element_size() if param is not None else 4,
        )


def _field(config, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _agreed_minimum(mesh: Mesh, value: int) -> int:
    """The smallest ``value`` over the ranks (one all-reduce: each rank fills its own slot)."""
    slots = torch.zeros(mesh.world_size, dtype=torch.float64)
    slots[mesh.rank] = value
    return int(mesh.all_reduce_sum(slots).min())


# ---------------------------------------------------------------- answers


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def f1_score(prediction: str, answer: str) -> float:
    """Token-overlap F1 of the normalised strings; two empty strings agree (1.0)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
