"""ZOTrainer: a transformers Trainer whose step is ZOOptimizer's, bit for bit.

One six-step run (evaluating after step 3, checkpointing every 2 steps) is checked against a plain
ZOOptimizer loop over the same batches in the same order: the sampler is sequential and
the dataset a whole number of batches, so batch k is rows [4k, 4k+4) of each epoch.
"""

import shutil

import pytest
import torch
import transformers
from tiny_models import tiny_batch, tiny_model

from distzo.hf import ZOArguments, ZOTrainer, model_loss
from distzo.optimizer import ZOOptimizer, causal_lm_loss
from distzo.schedules import Schedule

BATCH, STEPS, EVAL_AT, SAVE_EVERY = 4, 6, 3, 2
LR, EPS, WARMUP = 1e-3, 1e-3, 2
TRAIN = tiny_batch(rows=3 * BATCH, seq=8, seed=1)
EVAL = tiny_batch(rows=BATCH, seq=8, seed=2)


def _rows(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]


def _batch(step):
    """What the Trainer's sequential loader gives at ``step``: 3 batches an epoch."""
    lo = (step % 3) * BATCH
    return {k: v[lo : lo + BATCH] for k, v in TRAIN.items()}


def _args(out, **overrides):
    settings = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=WARMUP, seed=7,
        train_sampling_strategy="sequential", dataloader_drop_last=True, logging_steps=1,
        eval_strategy="steps", eval_steps=EVAL_AT, save_strategy="steps", save_steps=SAVE_EVERY,
        report_to="none", disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**settings, **overrides})


def _trainer(out, zo_args=None, model=None, cls=ZOTrainer, **overrides):
    return cls(
        model=model or tiny_model("llama"), args=_args(out, **overrides), train_dataset=_rows(TRAIN),
        eval_dataset=_rows(EVAL), data_collator=transformers.default_data_collator,
        zo_args=zo_args or ZOArguments(eps=EPS),
    )


def _losses(log_history):
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo-trainer")
    trainer = _trainer(out)
    trainer.train()
    return trainer, out


def _plain_run(steps, device):
    """``steps`` steps of ZOOptimizer itself on the Trainer's batches, the last update still pending."""
    model = tiny_model("llama").to(device)
    opt = ZOOptimizer(model, lr=LR, eps=EPS, seed=7, loss_fn=model_loss(model),
                      schedule=Schedule("linear", warmup_steps=WARMUP, total_steps=STEPS))
    stats = [opt.step({k: v.to(device) for k, v in _batch(t).items()}) for t in range(steps)]
    return opt, model, stats


@pytest.fixture(scope="module")
def plain(run):
    """Plain runs, each flushed only at its end: the 6-step run's stats, the weights after
    SAVE_EVERY, EVAL_AT and STEPS steps, and the eval loss after EVAL_AT steps before the flush."""
    device = run[0].args.device
    weights, unflushed = {}, {}
    for steps in (SAVE_EVERY, EVAL_AT, STEPS):
        opt, model, stats = _plain_run(steps, device)
        unflushed[steps] = _eval_loss(model)
        opt.flush()
        weights[steps] = {n: p.clone() for n, p in model.state_dict().items()}
    return stats, weights, unflushed[EVAL_AT]


def _eval_loss(model):
    with torch.no_grad():
        return float(model(**{k: v.to(model.device) for k, v in EVAL.items()}).loss)


def _assert_same_weights(state, model):
    for name, value in model.state_dict().items():
        assert torch.equal(state[name].to(value.device), value), name


def test_losses_and_weights_equal_plain_optimizer(run, plain):
    trainer, _ = run
    stats, weights, _ = plain
    assert len(stats) == STEPS
    logged = _losses(trainer.state.log_history)
    assert logged == {s.step + 1: float(torch.tensor(s.loss, dtype=torch.float32)) for s in stats}
    lrs = {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}
    assert lrs == {s.step + 1: s.lr for s in stats}
    # distzo's warm-up (step t at (t+1)/2 of the peak), then transformers' linear decay to 0 at step 6.
    assert list(lrs.values()) == pytest.approx([LR * f for f in (0.5, 1, 1, 0.75, 0.5, 0.25)])
    _assert_same_weights(weights[STEPS], trainer.model)


def test_model_loss_is_the_causal_lm_loss():
    model = tiny_model("llama")
    with torch.no_grad():
        out = model(input_ids=EVAL["input_ids"], attention_mask=EVAL["attention_mask"])
    assert float(model_loss(model)(out, EVAL)) == pytest.approx(float(causal_lm_loss(out, EVAL)), rel=1e-6)


def test_evaluation_sees_the_flushed_weights(run, plain):
    trainer, _ = run
    _, weights, unflushed = plain
    model = tiny_model("llama")
    model.load_state_dict(weights[EVAL_AT])
    [metrics] = [h for h in trainer.state.log_history if "eval_loss" in h and h["step"] == EVAL_AT]
    assert metrics["eval_loss"] == pytest.approx(_eval_loss(model), rel=1e-6)
    assert abs(unflushed - _eval_loss(model)) > 1e-4  # the last update matters


@pytest.mark.parametrize("steps", [SAVE_EVERY, STEPS])
def test_checkpoints_load_with_from_pretrained(run, plain, steps):
    _, out = run
    folder = out / f"checkpoint-{steps}"
    _assert_same_weights(plain[1][steps], transformers.AutoModelForCausalLM.from_pretrained(folder))
    assert (folder / "zo_state.json").is_file()


def test_resume_continues_bit_for_bit(run, tmp_path):
    trainer, out = run
    resumed = _trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_EVERY}"))  # then evaluates at 3
    assert resumed.zo.step_count == STEPS
    assert _losses(resumed.state.log_history) == _losses(trainer.state.log_history)
    _assert_same_weights(trainer.model.state_dict(), resumed.model)


def test_offloaded_blocks_train_the_same(run, tmp_path):
    trainer, _ = run
    offloaded = _trainer(tmp_path, ZOArguments(eps=EPS, offload="cpu"), eval_strategy="no", save_strategy="no")
    offloaded.train()
    assert offloaded.offload_engine is not None and offloaded.zo.offload is offloaded.offload_engine
    assert _losses(offloaded.state.log_history) == _losses(trainer.state.log_history)
    _assert_same_weights(trainer.model.state_dict(), offloaded.model)


@pytest.mark.parametrize("name", ["fzoo", "momentum", "sparse"])
def test_every_algorithm_trains_as_its_optimiser_does(name, tmp_path):
    trainer = _trainer(tmp_path, ZOArguments(eps=EPS, algorithm=name), eval_strategy="no", save_strategy="no")
    trainer.train()
    model = tiny_model("llama").to(trainer.args.device)
    opt = ZOOptimizer(model, lr=LR, eps=EPS, seed=7, loss_fn=model_loss(model), algorithm=name,
                      schedule=Schedule("linear", warmup_steps=WARMUP, total_steps=STEPS))
    stats = [opt.step({k: v.to(model.device) for k, v in _batch(t).items()}) for t in range(STEPS)]
    opt.flush()
    assert trainer.zo.algorithm.name == name
    assert _losses(trainer.state.log_history) == {s.step + 1: float(torch.tensor(s.loss, dtype=torch.float32))
                                                  for s in stats}
    _assert_same_weights(model.state_dict(), trainer.model)
    with pytest.raises(ValueError, match="unknown algorithm"):
        ZOArguments(algorithm="adam")


def test_resume_refuses_another_setting(run, tmp_path):
    _, out = run
    changed = _trainer(tmp_path, ZOArguments(eps=2 * EPS))
    with pytest.raises(ValueError, match="would change the ZO run's settings.*eps"):
        changed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_EVERY}"))


def test_resume_refuses_a_checkpoint_without_zo_state(run, tmp_path):
    _, out = run
    foreign = tmp_path / "checkpoint-2"
    shutil.copytree(out / f"checkpoint-{SAVE_EVERY}", foreign)
    (foreign / "zo_state.json").unlink()
    with pytest.raises(ValueError, match="not saved by ZOTrainer"):
        _trainer(tmp_path / "out").train(resume_from_checkpoint=str(foreign))


def test_compute_loss_func_is_the_training_loss(run, tmp_path):
    trainer, _ = run
    doubled = _trainer(tmp_path, max_steps=1, eval_strategy="no", save_strategy="no")
    own = model_loss(doubled.model)
    doubled.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: 2 * own(outputs, {"labels": labels})
    doubled.train()
    assert _losses(doubled.state.log_history)[1] == 2 * _losses(trainer.state.log_history)[1]


def test_load_best_model_at_end(tmp_path):
    # "Best" is the highest eval loss here, so that it is not the last step's model.
    trainer = _trainer(tmp_path, eval_steps=SAVE_EVERY, load_best_model_at_end=True,
                       metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = max(evals, key=evals.get)
    assert best_step != STEPS and trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    best = transformers.AutoModelForCausalLM.from_pretrained(trainer.state.best_model_checkpoint)
    _assert_same_weights(best.state_dict(), trainer.model)


class _OwnLoss(ZOTrainer):
    def compute_loss(self, model, inputs, **kwargs):
        return super().compute_loss(model, inputs, **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
        (dict(lr_scheduler_type="polynomial"), "'polynomial' has no ZO equivalent"),
        (dict(lr_scheduler_type="cosine_with_min_lr"), "needs lr_scheduler_kwargs min_lr"),
        (dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 2}), r"\['num_cycles'\]"),
    ],
)
def test_bad_settings_give_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, **overrides).train()


def test_compute_loss_override_is_refused(tmp_path):
    with pytest.raises(ValueError, match="override zo_loss"):
        _trainer(tmp_path, cls=_OwnLoss)


def test_zo_arguments_parse_and_default_to_training_arguments(tmp_path):
    (zo,) = transformers.HfArgumentParser(ZOArguments).parse_args_into_dataclasses(
        ["--eps", "0.01", "--directions", "2", "--offload", "cpu"]
    )
    assert (zo.eps, zo.directions, zo.offload_config.enabled) == (0.01, 2, True)
    resolved = ZOArguments().resolved(_args(tmp_path, weight_decay=0.1))
    assert (resolved.lr, resolved.weight_decay, resolved.seed) == (LR, 0.1, 7)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ZOArguments(eps=0).resolved(_args(tmp_path))
    with pytest.raises(ValueError, match="offload.mode"):
        ZOArguments(offload="disk")


def test_a_trainer_script_with_a_tokenizer_and_datasets(tiny_model_dir, tmp_path):
    # The README's example on the tiny Llama: a datasets.Dataset, the Trainer's column
    # pruning and the language-modelling collator, then save_model and from_pretrained.
    datasets = pytest.importorskip("datasets")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    texts = ["the movie was good", "a very bad plot", "great acting", "the film is not terrible"] * 2
    data = datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 1, 1] * 2}).map(
        lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text", "label"])
    args = transformers.TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-3, lr_scheduler_type="constant", report_to="none")
    trainer = ZOTrainer(model=model, args=args, train_dataset=data,
                        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
                        zo_args=ZOArguments(eps=1e-3))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = trainer.train()
    assert trainer.zo.step_count == 3 and torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model(tmp_path / "final")
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    _assert_same_weights(model.state_dict(), saved)
    assert any(not torch.equal(before[n], p) for n, p in saved.state_dict().items())


def test_a_batch_without_labels_is_refused(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "labels"} for row in _rows(TRAIN)]
    trainer = ZOTrainer(model=tiny_model("llama"), args=_args(tmp_path, eval_strategy="no", save_strategy="no"),
                        train_dataset=rows, data_collator=transformers.default_data_collator)
    with pytest.raises(ValueError, match="gave none"):
        trainer.train()
