"""Atomic checkpoints that survive a kill at any moment, and the trajectory log."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distzo import checkpoint
from distzo.checkpoint import (
    TrajectoryHeader,
    TrajectoryLog,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    load_checkpoint_state,
    recover_checkpoint,
    save_checkpoint,
)
from distzo.models import LoraSettings, apply_lora


@pytest.fixture
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _siblings(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name + "."))


def _fail_on(monkeypatch, should_fail):
    """Make os.replace raise for the calls ``should_fail(src, dst)`` picks."""
    real = os.replace

    def replace(src, dst):
        if should_fail(str(src), str(dst)):
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


# --------------------------------------------------------------------------- atomic files


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    atomic_write_json(path, {"step": 2, "loss": 0.5})
    assert json.loads(path.read_text()) == {"step": 2, "loss": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")
    _fail_on(monkeypatch, lambda src, dst: True)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no temp file left


# --------------------------------------------------------------------------- checkpoints


def test_save_and_load_checkpoint(tmp_path, tiny):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    seed = 2**64 - 59  # a double cannot hold it
    optim = {"lr": 1e-6, "step": 7, "pending": {"seeds": [seed, 3]}}
    save_checkpoint(dest, model, tokenizer, {"step": 7, "metrics": {"loss": 1.25}}, optim)
    assert is_complete(dest)
    state = load_checkpoint_state(dest)
    assert state["trainer_state"] == {"step": 7, "metrics": {"loss": 1.25}}
    assert state["optimizer_state"]["lr"] == 1e-6
    # plain JSON; the big seed as a decimal string, so any JSON reader keeps it exact
    raw = json.loads((dest / checkpoint.OPTIMIZER_STATE).read_text())
    assert raw["pending"]["seeds"] == [str(seed), 3] and int(state["optimizer_state"]["pending"]["seeds"][0]) == seed
    assert state["path"] == str(dest)
    reloaded = AutoModelForCausalLM.from_pretrained(dest)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(dest)("the movie").input_ids == tokenizer("the movie").input_ids
    assert _siblings(dest) == []


def test_checkpoints_of_the_old_layout_still_load(tmp_path, tiny):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 3})
    (dest / checkpoint.TRAINER_STATE).rename(dest / "trainer_state.json")
    torch.save({"step": 3, "seed": 0}, dest / "optimizer.pt")
    state = load_checkpoint_state(dest)
    assert state["trainer_state"] == {"step": 3} and state["optimizer_state"] == {"step": 3, "seed": 0}


def test_save_over_existing_checkpoint(tmp_path, tiny):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 1})
    save_checkpoint(dest, model, tokenizer, {"step": 2})
    state = load_checkpoint_state(dest)
    assert state["trainer_state"]["step"] == 2 and state["optimizer_state"] is None
    assert _siblings(dest) == []


def test_extra_files_change_with_their_checkpoint_only(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 1}, extra_files={"README.md": "card of step 1"})
    assert (dest / "README.md").read_text() == "card of step 1"
    _fail_on(monkeypatch, lambda src, dst: dst.endswith(checkpoint.COMPLETE))
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(dest, model, tokenizer, {"step": 2}, extra_files={"README.md": "card of step 2"})
    monkeypatch.undo()
    assert (dest / "README.md").read_text() == "card of step 1" and _siblings(dest) == []


@pytest.mark.parametrize(
    "crash_at",
    [
        "marker",  # writing COMPLETE inside the temporary folder
        "move-aside",  # renaming the old checkpoint out of the way
        "move-in",  # renaming the new one into place
    ],
)
def test_crash_mid_save_keeps_old_checkpoint(tmp_path, tiny, monkeypatch, crash_at):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 1})
    picks = {
        "marker": lambda src, dst: dst.endswith(checkpoint.COMPLETE),
        "move-aside": lambda src, dst: src == str(dest),
        "move-in": lambda src, dst: dst == str(dest) and ".tmp-" in src,
    }
    _fail_on(monkeypatch, picks[crash_at])
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(dest, model, tokenizer, {"step": 2})
    monkeypatch.undo()
    assert is_complete(dest)
    assert load_checkpoint_state(dest)["trainer_state"]["step"] == 1
    assert _siblings(dest) == []
    AutoModelForCausalLM.from_pretrained(dest)  # still a loadable model


def test_crash_while_writing_weights_keeps_old_checkpoint(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 1})

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(dest, model, tokenizer, {"step": 2})
    assert load_checkpoint_state(dest)["trainer_state"]["step"] == 1
    assert _siblings(dest) == []


def test_kill_between_renames_is_recovered(tmp_path, tiny, monkeypatch):
    """A kill (no exception handler runs) after the old checkpoint moved aside and before the
    new one moved in: readers find the new one; the next writer puts it in place."""
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, model, tokenizer, {"step": 1})

    class Killed(BaseException):
        pass

    real_replace = os.replace
    moved_aside = []

    def replace(src, dst):
        if str(src) == str(dest) or moved_aside:
            if moved_aside:
                raise Killed()
            moved_aside.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    with pytest.raises(Killed):
        save_checkpoint(dest, model, tokenizer, {"step": 2})
    monkeypatch.undo()

    assert not dest.exists() and len(_siblings(dest)) == 2
    state = load_checkpoint_state(dest)
    assert state["trainer_state"]["step"] == 2 and state["path"] != str(dest)
    assert not dest.exists()  # reading changes nothing
    recover_checkpoint(dest)
    assert load_checkpoint_state(dest)["trainer_state"]["step"] == 2
    assert _siblings(dest) == []


def test_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint_state(tmp_path / "nothing")
    half = tmp_path / "half"
    half.mkdir()
    (half / checkpoint.TRAINER_STATE).write_text('{"step": 3}')
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint_state(half)
    assert not is_complete(half)


def test_bad_trainer_state_writes_nothing(tmp_path, tiny):
    model, tokenizer = tiny
    dest = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="'step'"):
        save_checkpoint(dest, model, tokenizer, {"loss": 1.0})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(dest, model, tokenizer, {"step": 1, "config": object()})
    assert list(tmp_path.iterdir()) == []


def test_lora_checkpoint_has_adapter_and_merged_model(tmp_path, tiny):
    model, tokenizer = tiny
    peft_model = apply_lora(model, LoraSettings(r=2, alpha=4))
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    dest = tmp_path / "ckpt"
    save_checkpoint(dest, peft_model, tokenizer, {"step": 5})

    assert (dest / checkpoint.ADAPTER_DIR / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(dest)  # plain transformers, no peft
    ids = tokenizer("the film was very good", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)
    # The live model is untouched: still adapters, weights bit-identical.
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())


# --------------------------------------------------------------------------- trajectory log


def _header(**overrides):
    return TrajectoryHeader(**{"model": "default", "eps": 1e-3, "seed": 42, "q": 2, **overrides})


def test_trajectory_append_and_read(tmp_path):
    log = TrajectoryLog(tmp_path / "trajectory.jsonl")
    log.start(_header(dtype="bf16"))
    for step in (1, 2, 3):
        log.append(step, [step * 10, step * 10 + 1], [0.5, -0.25], lr=1e-6, loss=2.0 / step, tokens=64)
    log.close()
    records = TrajectoryLog(log.path).read()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "seeds": [20, 21], "grads": [0.5, -0.25], "lr": 1e-6, "loss": 1.0, "tokens": 64}
    header = TrajectoryLog(log.path).header()
    assert header.dtype == "bfloat16" and header.q == 2 and header.seed == 42
    assert json.loads(log.path.read_text().splitlines()[0])["header"]["model"] == "default"


def test_trajectory_floats_and_seeds_round_trip_exactly(tmp_path):
    grads = [0.1 + 0.2, 1 / 3, 5e-324, -0.0, 1.7976931348623157e308, float(torch.tensor(0.1, dtype=torch.float32))]
    seeds = [0, 2**64 - 1, 12345678901234567890, 7, 8, 9]
    with TrajectoryLog(tmp_path / "t.jsonl") as log:
        log.start(_header(q=6))
        log.append(1, seeds, [torch.tensor(g, dtype=torch.float64) for g in grads], lr=1e-7 / 3, loss=float("nan"))
    record = TrajectoryLog(tmp_path / "t.jsonl").read()[0]
    as_bits = lambda xs: [struct.pack("<d", x) for x in xs]  # noqa: E731 - bitwise, so -0.0 != 0.0
    assert as_bits(record["grads"]) == as_bits(grads)
    assert record["seeds"] == seeds
    assert struct.pack("<d", record["lr"]) == struct.pack("<d", 1e-7 / 3)
    assert record["loss"] != record["loss"]  # NaN survives


def test_trajectory_drops_torn_last_line_and_appends_after_it(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryLog(path) as log:
        log.start(_header())
        for step in (1, 2):
            log.append(step, [step, step], [0.1, 0.2], lr=1e-6, loss=1.0)
    with open(path, "ab") as f:
        f.write(b'{"step":3,"seeds":[3,3],"gra')  # the crash
    assert [r["step"] for r in TrajectoryLog(path).read()] == [1, 2]
    with TrajectoryLog(path) as log:  # resume appends cleanly after the torn tail
        log.append(3, [3, 3], [0.3, 0.4], lr=1e-6, loss=0.5)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert [r["step"] for r in TrajectoryLog(path).read()] == [1, 2, 3]


def test_trajectory_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryLog(path) as log:
        log.start(_header())
        log.append(1, [1, 1], [0.1, 0.2], lr=1e-6, loss=1.0)
    text = path.read_text()
    path.write_text(text + "garbage\n" + text.splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="corrupt line 3"):
        TrajectoryLog(path).read()


def test_trajectory_truncate_after(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TrajectoryLog(path)
    log.start(_header())
    for step in range(1, 6):
        log.append(step, [step, -step + 100], [step / 7, -step / 7], lr=1e-6, loss=1.0 / step)
    kept_before = TrajectoryLog(path).read()[:2]
    assert log.truncate_after(2) == 3
    assert TrajectoryLog(path).read() == kept_before  # rewritten records are exactly equal
    assert TrajectoryLog(path).header() == _header()
    log.append(3, [9, 9], [0.0, 1.0], lr=1e-6, loss=0.1)
    assert [r["step"] for r in TrajectoryLog(path).read()] == [1, 2, 3]
    log.close()


def test_trajectory_append_is_fsynced(tmp_path, monkeypatch):
    log = TrajectoryLog(tmp_path / "t.jsonl")
    log.start(_header())
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    log.append(1, [1, 2], [0.1, 0.2], lr=1e-6, loss=1.0)
    assert synced == [log._file.fileno()]
    log.close()


def test_trajectory_validation(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TrajectoryLog(path)
    path.write_text("")
    with pytest.raises(ValueError, match="start"):
        log.append(1, [1], [0.1], lr=1e-6, loss=1.0)
    log.start(_header())
    log.start(_header())  # resuming with the same settings is fine
    with pytest.raises(ValueError, match=r"different settings: \['eps'\]"):
        TrajectoryLog(path).start(_header(eps=1e-4))
    log.append(1, [1, 2], [0.1, 0.2], lr=1e-6, loss=1.0)
    with pytest.raises(ValueError, match="does not follow"):
        log.append(1, [1, 2], [0.1, 0.2], lr=1e-6, loss=1.0)
    with pytest.raises(ValueError, match="one projected gradient per seed"):
        log.append(2, [1, 2], [0.1], lr=1e-6, loss=1.0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        log.append(2, [1.5], [0.1], lr=1e-6, loss=1.0)
    log.close()
    assert [r["step"] for r in TrajectoryLog(path).read()] == [1]


@pytest.mark.parametrize(
    "overrides", [{"perturbation": "uniform"}, {"eps": 0.0}, {"q": 0}, {"dtype": "int8"}, {"weight_decay": -1.0}]
)
def test_trajectory_header_validates(overrides):
    with pytest.raises(ValueError):
        _header(**overrides)


def test_seeds_are_written_as_decimal_strings_and_read_back_as_ints(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryLog(path) as log:
        log.start(_header(q=2))
        log.append(0, [2**64 - 1, torch.tensor(7)], [0.5, -0.5], lr=1e-6, loss=1.0)
    line = json.loads(path.read_text().splitlines()[1])
    assert line["seeds"] == ["18446744073709551615", "7"]  # exact in jq and JavaScript too
    assert TrajectoryLog(path).read()[0]["seeds"] == [2**64 - 1, 7]
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        TrajectoryLog(path).append(1, [2**64, 1], [0.1, 0.2], lr=1e-6, loss=1.0)


def test_logs_with_integer_seeds_still_read(tmp_path):
    path = tmp_path / "t.jsonl"
    header = {"model": "default", "eps": 0.001, "seed": 42, "q": 1}  # a header from before base/environment
    path.write_text(json.dumps({"header": header}) + "\n"
                    + '{"step":0,"seeds":[12345678901234567890],"grads":[0.1],"lr":1e-06,"loss":1.0}\n')
    log = TrajectoryLog(path)
    assert log.header().base is None and log.header().environment is None
    assert log.read()[0]["seeds"] == [12345678901234567890]
    log.truncate_after(0)  # rewritten as it was: old lines stay old
    assert json.loads(path.read_text().splitlines()[1])["seeds"] == [12345678901234567890]


@pytest.mark.parametrize("bad", ['"-1"', '"1e3"', '" 12"', "1.5", "true", '"0x10"'])
def test_bad_seeds_in_a_log_are_errors(tmp_path, bad):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"header": {"model": "default"}}) + "\n"
                    + f'{{"step":0,"seeds":[{bad}],"grads":[0.1],"lr":1e-06,"loss":1.0}}\n')
    with pytest.raises(ValueError, match="line 2: a seed"):
        TrajectoryLog(path).read()


def test_events_are_kept_apart_from_steps(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TrajectoryLog(path)
    log.start(_header(q=1))
    for step in range(3):
        log.append(step, [step], [0.1], lr=1e-6, loss=1.0)
    event = log.append_event("extended", 3, steps_from=3, steps_to=6)
    assert event == {"event": "extended", "step": 3, "steps_from": 3, "steps_to": 6}
    log.close()
    assert json.loads(path.read_text().splitlines()[-1]) == event  # on disk before append_event returns
    reopened = TrajectoryLog(path)
    assert reopened.last_step() == 2
    reopened.append(3, [3], [0.1], lr=1e-6, loss=1.0)  # the event is no step: 3 follows 2
    reopened.append_event("lr", 4, lr=1e-7)
    reopened.append(4, [4], [0.1], lr=1e-7, loss=1.0)
    assert [r["step"] for r in reopened.read()] == [0, 1, 2, 3, 4]
    assert [(e["event"], e["step"]) for e in reopened.events()] == [("extended", 3), ("lr", 4)]
    assert reopened.truncate_after(3) == 1  # one step record dropped, and the event of step 4
    assert [(e["event"], e["step"]) for e in reopened.events()] == [("extended", 3)]
    assert [r["step"] for r in reopened.read()] == [0, 1, 2, 3]
    reopened.close()


def test_event_validation(tmp_path):
    log = TrajectoryLog(tmp_path / "t.jsonl")
    log.start(_header(q=1))
    log.append(0, [1], [0.1], lr=1e-6, loss=1.0)
    with pytest.raises(ValueError, match="comes after the logged step 0"):
        log.append_event("extended", 0)
    with pytest.raises(ValueError, match="kind"):
        log.append_event("", 1)
    with pytest.raises(ValueError, match="'event' is the event's kind"):
        log.append_event("extended", 1, event="x")
    with pytest.raises(TypeError):
        log.append_event("extended", 1, value=object())
    with pytest.raises(ValueError, match="'event' marks event lines"):
        log.append(1, [1], [0.1], lr=1e-6, loss=1.0, event="x")  # would read back as an event
    log.close()
    assert TrajectoryLog(log.path).events() == []


def test_joined_or_damaged_logs_are_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrajectoryLog(path) as log:
        log.start(_header(q=1))
        log.append(0, [1], [0.1], lr=1e-6, loss=1.0)
    text = path.read_text()
    path.write_text(text + text)  # two logs concatenated
    with pytest.raises(ValueError, match="line 3 is a second header"):
        TrajectoryLog(path).read()
    path.write_text(text + '{"step":1,"grads":[0.1]}\n')
    with pytest.raises(ValueError, match=r"line 3: a step record needs \['seeds', 'lr', 'loss'\]"):
        TrajectoryLog(path).read()
    path.write_text(text + '{"step":1,"seeds":"12","grads":[0.1, 0.2],"lr":1e-06,"loss":1.0}\n')
    with pytest.raises(ValueError, match="line 3: a step record's seeds and grads are lists"):
        TrajectoryLog(path).read()


def test_resumed_log_keeps_the_provenance_of_its_step_0(tmp_path):
    first = checkpoint.BaseIdentity("llama", ["LlamaForCausalLM"], "a" * 32, "b" * 32)
    log = TrajectoryLog(tmp_path / "t.jsonl")
    log.start(_header(base=first, environment={"torch": "2.5.0", "device": "cpu"}))
    later = checkpoint.BaseIdentity("llama", ["LlamaForCausalLM"], "a" * 32, "c" * 32)  # a checkpoint's weights
    kept = TrajectoryLog(log.path).start(_header(base=later, environment={"torch": "2.6.0", "device": "cpu"}))
    assert kept.base == first and kept.environment == {"torch": "2.5.0", "device": "cpu"}
    assert TrajectoryLog(log.path).header() == kept  # nested record round-trips through JSON
    with pytest.raises(ValueError, match="unknown base identity keys"):
        TrajectoryHeader.from_dict({"model": "x", "base": {**vars(first), "size": 1}})


def test_base_identity_is_the_same_on_cpu_and_offloaded(tiny_model_dir):
    from distzo.offload import OffloadConfig, OffloadEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    on_cpu = checkpoint.BaseIdentity.of(model)
    assert (on_cpu.model_type, on_cpu.architectures) == ("llama", ["LlamaForCausalLM"])
    OffloadEngine(model, "cpu", OffloadConfig("cpu"))  # blocks now live in the engine's host buffers
    assert checkpoint.BaseIdentity.of(model) == on_cpu
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[-1, -1] += 1.0  # the last element is in the sample
    assert checkpoint.BaseIdentity.of(model).weights != on_cpu.weights
    assert checkpoint.BaseIdentity.of(model).params == on_cpu.params
    halves = checkpoint.BaseIdentity.of(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16))
    assert halves.params != on_cpu.params and halves.weights != on_cpu.weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_base_identity_is_the_same_on_the_gpu(tiny_model_dir):
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
        on_cpu = checkpoint.BaseIdentity.of(model)
        assert checkpoint.BaseIdentity.of(model.to("cuda")) == on_cpu
