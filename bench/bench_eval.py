"""Evaluation of an offloaded model: the old evaluation path against the current one, same model, same examples.

    PYTHONPATH=src python3 bench/bench_eval.py --out eval.json                  # OPT-30B shape, one GPU
    PYTHONPATH=src python3 bench/bench_eval.py --old-gen-batches 0 --out e.json # the old generation in full
    PYTHONPATH=src python3 bench/bench_eval.py --device cpu --tiny              # a check of every path on the CPU

The model is an OPT-30B-shaped causal LM (hidden 7168, 48 layers, ffn 28672, 56 heads, vocab
50272) in bf16 with random N(0, 0.02) weights, built on the meta device and handed to distzo's
``OffloadEngine`` (blocks in pinned host memory, streamed through the GPU; prefetch 1), as a
``--offload cpu`` run trains it. The tokenizer is word-level with one word per vocabulary id
("w123"), so every text is exactly as many tokens as words, and no file or download is needed.

Workloads (the examples are the same for both paths):

  classification  1,000 examples, a prompt of 50-70 tokens and two single-token candidates (as
                  SST-2's " great" / " terrible"): accuracy by candidate scores
  generation      100 prompts of 380-420 tokens, 50 new tokens each, greedy (EOS switched off
                  in the generation config, so every prompt decodes all 50): F1 / EM

Paths:

  old  the evaluation before the sharded / budgeted change, with the trainer's default
       eval_batch_size=32. Classification is ``distzo.evaluate.evaluate(..., batch_size=32)``: the
       forwards of the old code (same collation, one row per example for single-token
       candidates, last-position logits, sorted by length; the old code sorted by prompt length,
       the current one by the whole text, which for these examples is the same order up to ties).
       Generation is emulated as the old ``generate`` ran it: batches of 32 prompts in the
       caller's order, ``collate_prompts``, then ``model.generate(..., do_sample=False)`` with
       the model's ``use_cache``, which distzo turns off for training, so ``use_cache=False``:
       every new token is a forward over the whole prefix. That path takes minutes on this
       model, so by default only its first batch (32 prompts) is timed (``--old-gen-batches``;
       0 = all) and the total is extrapolated: ``old_s_low`` counts the partial last batch by
       its share of rows, ``old_s_high`` as a full batch; the speed-up is reported against both.
  new  ``distzo.evaluate.evaluate(..., batch_size="auto")`` as the trainer calls it with
       ``--eval-batch-size auto`` (max_length 512): the batch size planned from the free GPU
       memory, generation with the KV cache.

For each (workload, path): seconds, examples per forward (the batch size used), model forwards,
block uploads (``engine.uploads``) and GB moved up, peak allocated and driver-side GPU memory,
and the metric (the two paths must agree up to bf16 batch effects). Then the speed-ups, against
the goals (classification >= 5x, generation >= 3x). Every measurement is guarded: an error (an OOM
above all) is recorded as a string and the others still run. Results go to stdout as JSON lines
as they come and to ``--out`` (rewritten after each measurement).

On one H200 with a PCIe 5 link (~50 GB/s pinned) it is expected to take 5-7 minutes: about
1.5 min to build, ~40 s old classification, ~10 s new, ~1-2 min new generation, ~1.5-2 min for
the old generation's first batch. ``--skip-old`` times the new path alone.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (Recorder, device_of, environment, guarded, memory, opt_config, release, reset_peak,  # noqa: E402
                      sync)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPT_30B = dict(hidden=7168, layers=48, ffn=28672, heads=56, vocab=50272)
TINY = dict(hidden=64, layers=2, ffn=256, heads=4, vocab=512)
SPECIALS = ("<unk>", "<pad>", "</s>")  # ids 0, 1, 2 as OPT's tokenizer has them (pad 1, bos = eos 2)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per model id: "w<id>" is token <id>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="</s>", eos_token="</s>")


def words(rng: random.Random, count: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(len(SPECIALS), vocab)}" for _ in range(count))


def classification_examples(n: int, tokens: int, vocab: int, seed: int = 0):
    from distzo.tasks.base import Example

    rng = random.Random(seed)
    spread = max(1, tokens // 6)
    return [Example(prompt=words(rng, rng.randint(tokens - spread, tokens + spread) - 1, vocab),
                    candidates=[" w5", " w6"], gold=rng.randrange(2)) for _ in range(n)]


def generation_examples(n: int, tokens: int, vocab: int, seed: int = 1):
    from distzo.tasks.base import Example

    rng = random.Random(seed)
    spread = max(1, tokens // 20)
    return [Example(prompt=words(rng, rng.randint(tokens - spread, tokens + spread), vocab),
                    target=words(rng, 3, vocab), answers=[words(rng, 3, vocab)]) for _ in range(n)]


# ---------------------------------------------------------------- the old generation path


@torch.no_grad()
def old_generate(model, tokenizer, examples, batch_size: int, max_new_tokens: int, max_length: int,
                 max_batches: int = 0) -> tuple[list[str], int]:
    """Greedy generation as the evaluation did it before the KV-cache change: batches in the
    caller's order, no cache (the model's training setting). Stops after ``max_batches`` (0: all);
    returns the texts of the batches run and how many batches that was."""
    from distzo.evaluate import batches, eval_mode, model_device
    from distzo.tasks.collate import collate_prompts, pad_id

    device = model_device(model)
    texts: list[str] = []
    done = 0
    with eval_mode(model):
        for chunk in batches(examples, batch_size):
            if max_batches and done == max_batches:
                break
            batch = collate_prompts(chunk, tokenizer, max_length - max_new_tokens)
            ids = batch["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer),
                                 use_cache=False)
            texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            done += 1
    return [t.split("\n")[0].strip() for t in texts], done


# ---------------------------------------------------------------- measuring


class Counters:
    """Forwards of the decoder, and the rows of the largest forward: the batch size a path used."""

    def __init__(self, model):
        self.forwards = 0
        self.max_rows = 0
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self._hook = decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        rows = ids.shape[0] if ids is not None else embeds.shape[0] if embeds is not None else 0
        self.forwards += 1
        self.max_rows = max(self.max_rows, rows)

    def reset(self) -> None:
        self.forwards = self.max_rows = 0


def run_path(fn, engine, counters: Counters, device: torch.device) -> dict:
    """Seconds of ``fn()`` (synchronised), with the forwards, uploads and memory it took."""
    release()
    reset_peak(device)
    counters.reset()
    uploads, up = engine.uploads, engine.bytes_up
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    values = {"s": round(seconds, 3), "forwards": counters.forwards, "rows_per_forward_max": counters.max_rows,
              "uploads": engine.uploads - uploads, "GB_up": round((engine.bytes_up - up) / 1e9, 4), **memory(device)}
    values.update(out or {})
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few examples: checks every path quickly")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's 48)")
    ap.add_argument("--cls-examples", type=int, default=None, help="classification examples (1000)")
    ap.add_argument("--cls-tokens", type=int, default=None, help="mean prompt tokens of a classification example (60)")
    ap.add_argument("--gen-prompts", type=int, default=None, help="generation prompts (100)")
    ap.add_argument("--gen-tokens", type=int, default=None, help="mean prompt tokens of a generation prompt (400)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (50)")
    ap.add_argument("--max-length", type=int, default=None, help="the task's max_length (512)")
    ap.add_argument("--old-batch", type=int, default=32, help="the old path's eval_batch_size")
    ap.add_argument("--old-gen-batches", type=int, default=1,
                    help="old generation batches to time, the rest extrapolated (0: all)")
    ap.add_argument("--new-batch", default="auto", help="the new path's eval_batch_size (auto or an integer)")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--only", choices=["classification", "generation"], default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = device_of(args.device)
    tiny = args.tiny
    shape = TINY if tiny else OPT_30B
    cls_n = args.cls_examples or (40 if tiny else 1000)
    cls_tokens = args.cls_tokens or (12 if tiny else 60)
    gen_n = args.gen_prompts or (10 if tiny else 100)
    gen_tokens = args.gen_tokens or (30 if tiny else 400)
    new_tokens = args.new_tokens or (5 if tiny else 50)
    max_length = args.max_length or (64 if tiny else 512)
    old_batch = 4 if tiny and args.old_batch == 32 else args.old_batch
    new_batch = args.new_batch if args.new_batch == "auto" else int(args.new_batch)

    rec = Recorder(args.out, environment(device, sys.argv[1:] if argv is None else argv, "bench_eval.py"))
    from distzo.evaluate import evaluate
    from distzo.offload import OffloadConfig, OffloadEngine, build_on_meta, random_init

    cfg = opt_config(shape, args.layers, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    t0 = time.perf_counter()
    model = build_on_meta(cfg)
    engine = OffloadEngine(model, device, OffloadConfig("cpu", prefetch=1), init=random_init())
    sync(device)
    model.generation_config.eos_token_id = None  # every prompt decodes all its new tokens, on both paths
    model.generation_config.pad_token_id = 1
    tokenizer = word_tokenizer(cfg.vocab_size)
    counters = Counters(model)
    params = sum(p.numel() for p in model.parameters())
    rec.put("setup", {"model": "tiny OPT" if tiny else "OPT-30B shape", "layers": cfg.num_hidden_layers,
                      "hidden": cfg.hidden_size, "params_B": params / 1e9, "blocks": len(engine.blocks),
                      "block_GB": engine.block_bytes / 1e9, "build_s": round(time.perf_counter() - t0, 1),
                      "prefetch": engine.prefetch, "max_length": max_length, "old_batch": old_batch,
                      "new_batch": new_batch, **memory(device)})

    # Kernels, cuBLAS handles and the generation machinery start up once, outside every timing.
    guarded(rec, "warmup", lambda: run_path(lambda: warm_up(model, tokenizer, cfg.vocab_size, max_length),
                                            engine, counters, device))
    summary: dict = {}
    if args.only in (None, "classification"):
        examples = classification_examples(cls_n, cls_tokens, cfg.vocab_size)
        work = {"examples": cls_n, "mean_prompt_tokens": cls_tokens, "candidates": 2}

        def classify(size):
            return lambda: evaluate(model, tokenizer, "classification", examples, size, max_length)

        new = guarded(rec, "classification_new", lambda: {**work, **run_path(classify(new_batch), engine, counters,
                                                                               device)})
        old = None if args.skip_old else guarded(
            rec, "classification_old", lambda: {**work, **run_path(classify(old_batch), engine, counters, device)})
        if new and old:
            summary["classification_speedup"] = old["s"] / new["s"]
            summary["classification_goal_5x"] = summary["classification_speedup"] >= 5
            summary["classification_same_accuracy"] = old.get("accuracy") == new.get("accuracy")

    if args.only in (None, "generation"):
        examples = generation_examples(gen_n, gen_tokens, cfg.vocab_size)
        work = {"prompts": gen_n, "mean_prompt_tokens": gen_tokens, "new_tokens": new_tokens}
        new = guarded(rec, "generation_new", lambda: {**work, **run_path(
            lambda: evaluate(model, tokenizer, "generation", examples, new_batch, max_length, new_tokens),
            engine, counters, device)})
        old = None if args.skip_old else guarded(rec, "generation_old", lambda: {**work, **old_generation(
            model, tokenizer, examples, old_batch, new_tokens, max_length, args.old_gen_batches, engine, counters,
            device)})
        if new and old:
            summary["generation_speedup_low"] = old["old_s_low"] / new["s"]
            summary["generation_speedup_high"] = old["old_s_high"] / new["s"]
            summary["generation_goal_3x"] = summary["generation_speedup_low"] >= 3
            summary["generation_old_extrapolated"] = old["batches_timed"] < old["batches_total"]
    if summary:
        rec.put("summary", summary)
    engine.close()
    return 0


def warm_up(model, tokenizer, vocab: int, max_length: int) -> dict:
    from distzo.evaluate import evaluate

    evaluate(model, tokenizer, "classification", classification_examples(4, 8, vocab, seed=7), 2, max_length)
    evaluate(model, tokenizer, "generation", generation_examples(2, 8, vocab, seed=7), 2, max_length, 2)
    old_generate(model, tokenizer, generation_examples(2, 8, vocab, seed=7), 2, 2, max_length)
    return {}


def old_generation(model, tokenizer, examples, batch: int, new_tokens: int, max_length: int, max_batches: int,
                   engine, counters, device) -> dict:
    from distzo.evaluate import exact_match, f1_score

    total = math.ceil(len(examples) / batch)
    timed_batches = total if max_batches <= 0 else min(max_batches, total)
    holder = {}

    def go():
        texts, done = old_generate(model, tokenizer, examples, batch, new_tokens, max_length, timed_batches)
        holder["texts"], holder["done"] = texts, done

    values = run_path(go, engine, counters, device)
    done, texts = holder["done"], holder["texts"]
    rows = [min(batch, len(examples) - i * batch) for i in range(total)]
    per_full = values["s"] / sum(rows[:done]) * batch  # seconds for one full batch, from the batches timed
    if done == total:
        low = high = values["s"]
    else:
        rest = rows[done:]
        low = values["s"] + per_full * sum(rest) / batch  # a short batch by its share of rows
        high = values["s"] + per_full * len(rest)  # a short batch as long as a full one
    pairs = list(zip(texts, examples))
    values.update(batches_timed=done, batches_total=total, old_s_low=round(low, 2), old_s_high=round(high, 2),
                  f1_of_timed=sum(max(f1_score(t, a) for a in e.answers) for t, e in pairs) / len(pairs),
                  em_of_timed=sum(max(exact_match(t, a) for a in e.answers) for t, e in pairs) / len(pairs))
    return values


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    raise SystemExit(main())
