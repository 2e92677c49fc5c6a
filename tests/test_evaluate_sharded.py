"""Evaluation at the scale of training: sharded over ranks, batched by memory, generation batched.

Sharded cases run as real gloo processes (this file is their script, as in tests/test_parallel.py):
every rank scores its share and the metrics must equal the one-process ones — to the bit for
accuracy, F1 and EM (the per-example rows are the same numbers), to float64 tolerance for losses —
resident and with sliced offload, where every forward is collective and the ranks run in lockstep.
The model is the tiny word-level Llama in float64 throughout, so batching and padding move a score
by ~1e-16 and never flip a prediction.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
WORDS = "the a movie film was is good bad great terrible plot acting not very".split()
# (name, task kind, examples, batch size): uneven shares on 2 and 4 ranks, and a rank with none.
CASES = [
    ("single-token", "classification", 7, 2),
    ("multi-token", "classification", 7, 3),
    ("few", "classification", 3, 2),
    ("generation", "generation", 7, 2),
    ("generation-alone", "generation", 7, 1),  # one prompt a batch: batches stop after different steps
    ("loss", "lm", 7, 2),
    ("loss-few", "lm", 3, 4),
]
MAX_NEW_TOKENS = 4
STOP_WORD = "plot"


def _examples(name: str, kind: str, n: int) -> list:
    from distzo.tasks import Example

    rng = random.Random(name)
    out = []
    for _ in range(n):
        words = " ".join(rng.choices(WORDS, k=rng.randint(2, 7)))
        if kind == "classification":
            cands = [" good", " bad"] if name != "multi-token" else [" good movie", " bad", " not very great"]
            out.append(Example(prompt=words + " was", candidates=cands, gold=rng.randrange(len(cands))))
        elif kind == "generation":
            # The random model repeats one word; long answers make the F1s partial and varied.
            answers = [" ".join(rng.choices(WORDS, k=5)) for _ in range(3)]
            out.append(Example(prompt=words, target=" " + answers[0] + "\n", answers=answers))
        else:
            out.append(Example(prompt=words, target=" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))))
    return out


def _model(model_dir: Path):
    from tiny_models import float64_throughout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.config.use_cache = False  # as distzo loads models; generation turns the cache on itself
    # A word the random model emits first after some prompts and never after others ends generation:
    # some batches stop at once, others run to MAX_NEW_TOKENS.
    model.generation_config.eos_token_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(STOP_WORD)
    return float64_throughout(model).eval(), AutoTokenizer.from_pretrained(model_dir)


def _evaluate_cases(model, tokenizer, batch_size=None, **kwargs) -> dict[str, dict[str, float]]:
    from distzo.evaluate import evaluate

    return {name: evaluate(model, tokenizer, kind, _examples(name, kind, n), batch_size or size,
                           max_length=32, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
            for name, kind, n, size in CASES}


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "loss":
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key  # counts and per-example scores combine exactly


@pytest.fixture(scope="module")
def single_process(tiny_model_dir) -> dict[str, dict[str, float]]:
    model, tokenizer = _model(tiny_model_dir)
    return _evaluate_cases(model, tokenizer, batch_size=1)


def test_cases_are_not_trivial(single_process):
    # Metrics strictly between the extremes: a wrong combination would show.
    for name in ("single-token", "multi-token"):
        assert 0 < single_process[name]["accuracy"] < 1, (name, single_process[name])
    assert 0 < single_process["generation"]["f1"] < 1


def test_some_generations_stop_early(tiny_model_dir):
    from distzo.evaluate import generate

    model, tokenizer = _model(tiny_model_dir)
    texts = generate(model, tokenizer, _examples("generation-alone", "generation", 7), MAX_NEW_TOKENS, 1, 32)
    lengths = {len(t.split()) for t in texts}
    assert 1 in lengths and MAX_NEW_TOKENS in lengths, texts


@pytest.mark.parametrize("batch_size", [3, 8, "auto"])
def test_batch_size_changes_no_metric(tiny_model_dir, single_process, batch_size):
    model, tokenizer = _model(tiny_model_dir)
    got = _evaluate_cases(model, tokenizer, batch_size=batch_size)
    for name, _, _, _ in CASES:
        _assert_same(got[name], single_process[name])


def test_auto_batch_size_on_a_gpu_fills_the_planned_share(tiny_model_dir, monkeypatch):
    # The GPU branch on a CPU machine: the free memory is what the (patched) CUDA calls say.
    from distzo import evaluate as ev

    model, tokenizer = _model(tiny_model_dir)
    examples = _examples("multi-token", "classification", 7)
    per_example = ev.bytes_per_example(model, tokenizer, "classification", examples, max_length=32)
    monkeypatch.setattr(ev, "model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * per_example, 10 * per_example))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: per_example)  # cached but unused
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert ev.auto_batch_size(model, tokenizer, "classification", examples, 32) == int(4 * ev.MEMORY_SHARE)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000 * per_example, 2000 * per_example))
    assert ev.auto_batch_size(model, tokenizer, "classification", examples, 32) == len(examples)  # no more than all
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 2000 * per_example))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    assert ev.auto_batch_size(model, tokenizer, "classification", examples, 32) == 1  # at least one


def test_auto_batches_take_the_fewest_passes_in_equal_batches():
    from distzo.evaluate import fewest_passes

    assert fewest_passes(100, 96, 115) == 100  # a little more memory saves the second pass
    assert fewest_passes(100, 40, 48) == 34  # three passes either way: 34 + 33 + 33, not 40 + 40 + 20
    assert fewest_passes(7, 2, 2) == 2
    assert fewest_passes(5, 5, 6) == 5 and fewest_passes(1, 1, 1) == 1


def test_an_example_costs_more_memory_the_longer_it_is(tiny_model_dir):
    from distzo.evaluate import bytes_per_example
    from distzo.tasks import Example

    model, tokenizer = _model(tiny_model_dir)
    short = [Example(prompt="good", candidates=[" good", " bad"], gold=0)]
    long = [Example(prompt="good " * 20, candidates=[" good", " bad"], gold=0)]
    rows = [Example(prompt="good", candidates=[" good movie", " bad", " not very great"], gold=0)]
    cost = {name: bytes_per_example(model, tokenizer, "classification", ex, max_length=64)
            for name, ex in (("short", short), ("long", long), ("rows", rows))}
    assert cost["short"] < cost["long"] and cost["short"] < cost["rows"]
    # Generation also holds the KV cache of its new tokens.
    assert bytes_per_example(model, tokenizer, "generation", short, 64, 8) > bytes_per_example(
        model, tokenizer, "lm", [Example(prompt="good", target=" a")], 64)


# ---------------------------------------------------------------- generation under offload


def _greedy_one_by_one(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Obviously correct: one prompt, no padding, no cache, the whole prefix every step."""
    from distzo.tasks.collate import bos_ids

    ids = bos_ids(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] == model.generation_config.eos_token_id:  # kept, as generate keeps it
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_offloaded_generation_decodes_the_batch_together(tiny_model_dir):
    from distzo.evaluate import generate
    from distzo.offload import OffloadConfig, OffloadEngine

    examples = _examples("generation", "generation", 4)
    resident, tokenizer = _model(tiny_model_dir)
    want = [_greedy_one_by_one(resident, tokenizer, e.prompt, MAX_NEW_TOKENS) for e in examples]
    assert generate(resident, tokenizer, examples, MAX_NEW_TOKENS, 4, 32, stop=None) == want
    model, _ = _model(tiny_model_dir)
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"))
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape))
    assert generate(model, tokenizer, examples, MAX_NEW_TOKENS, 4, 32, stop=None) == want
    hook.remove()
    assert all(w == (len(examples), 1) for w in widths[1:])  # the KV cache: one new token per prompt a step
    # One forward per new token for the whole batch, each block up once per forward (prefetch:
    # the next forward's first block goes up early), not once per prompt and token.
    blocks = len(engine.blocks)
    assert engine.uploads <= (MAX_NEW_TOKENS + 1) * blocks < len(examples) * MAX_NEW_TOKENS * blocks
    engine.close()


# ---------------------------------------------------------------- ranks


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory) -> dict[int, list[dict]]:
    from test_parallel import _finish, _start_ranks

    out = tmp_path_factory.mktemp("sharded")
    results = {}
    for world in (2, 4):
        procs = _start_ranks(world, ["sharded", str(tiny_model_dir), str(out)], script=HERE)
        for code, _, err in _finish(procs):
            assert code == 0, err[-3000:]
        results[world] = [json.loads((out / f"{world}-rank{r}.json").read_text()) for r in range(world)]
    return results


@pytest.mark.parametrize("engine", ["resident", "sliced"])
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_evaluation_equals_one_process(sharded, single_process, world, engine):
    for rank in sharded[world]:  # every rank ends with the whole split's metrics
        for name, _, _, _ in CASES:
            _assert_same(rank[engine][name], single_process[name])


def test_sliced_ranks_run_the_same_forwards(sharded):
    for world, ranks in sharded.items():
        assert len({r["uploads"] for r in ranks}) == 1, world  # one gather per block and forward on each
        assert ranks[0]["scored"] < sum(n for _, _, n, _ in CASES)  # ... but each scored its share only


def _run_sharded(model_dir: Path, out: Path) -> None:
    from distzo import evaluate as ev
    from distzo import parallel
    from distzo.offload import OffloadConfig, OffloadEngine

    mesh = parallel.init(parallel.ParallelConfig(timeout_s=60))
    scored = 0
    real_rows = ev.example_rows

    def counting(kind, model, tokenizer, examples, *args, **kwargs):
        nonlocal scored
        scored += len(examples)
        return real_rows(kind, model, tokenizer, examples, *args, **kwargs)

    ev.example_rows = counting
    record: dict = {}
    model, tokenizer = _model(model_dir)
    record["resident"] = _evaluate_cases(model, tokenizer, mesh=mesh)
    model, tokenizer = _model(model_dir)
    engine = OffloadEngine(model, "cpu", OffloadConfig("cpu"), slices=parallel.node_slices(mesh))
    scored = 0
    record["sliced"] = _evaluate_cases(model, tokenizer, mesh=mesh, lockstep=True)
    record["uploads"], record["scored"] = engine.uploads, scored
    engine.close()
    (out / f"{mesh.world_size}-rank{mesh.rank}.json").write_text(json.dumps(record))
    mesh.close()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[1] == "sharded":
        _run_sharded(Path(sys.argv[2]), Path(sys.argv[3]))
    # The record is on disk and the group destroyed: skip the interpreter's teardown, where gloo's
    # threads can outlive finalization (see worker() in tests/test_parallel.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
