"""``distzo replay`` never lies and never destroys: it checks the base, the log and the output
folder before writing anything, says how many steps it replayed, and rebuilds the run's
checkpoint bit for bit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from tiny_models import tiny_model

from distzo import directions
from distzo.checkpoint import TrajectoryLog
from distzo.cli import main
from distzo.environment import describe
from distzo.replay import replay_into
from distzo.units import trainable_params

TINY = dict(vocab_size=17, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2)  # the tiny_model_dir fixture's model


def _train(model_dir, data_dir, out, *extra) -> Path:
    argv = ["train", "--lora", "false", "--model", str(model_dir), "--task", "sst2", "--data", str(data_dir),
            "--output-dir", str(out), "--task.num_train", "32", "--task.num_dev", "8", "--task.num_test", "8",
            "--batch-size", "4", "--lr", "1e-2", "--eps", "1e-2", "--progress", "false", "--tensorboard", "false",
            "--zero_shot", "false", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def run(tiny_model_dir, sst2_dir, tmp_path_factory) -> Path:
    """A finished 3-step run. Read-only: copy it before a test that could change it."""
    return _train(tiny_model_dir, sst2_dir, tmp_path_factory.mktemp("replay") / "run", "--steps", "3")


def _replay(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what training printed before
    code = main(["replay", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, *argv) -> str:
    code, _, err = _replay(capsys, *argv)
    err = err.strip()
    assert code == 2 and err.startswith("distzo: error: ") and "\n" not in err, err
    return err


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def _rewrite(log: Path, dest: Path, edit) -> Path:
    """A copy of ``log`` whose parsed lines (header first) went through ``edit``."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    dest.write_text("".join(json.dumps(line) + "\n" for line in edit(lines)))
    return dest


# --------------------------------------------------------------------------- it works, and says so


def test_replay_rebuilds_the_checkpoint_and_says_how_many_steps(run, tiny_model_dir, tmp_path, capsys):
    code, out, err = _replay(capsys, tiny_model_dir, run / "trajectory.jsonl", "--output", tmp_path / "rebuilt")
    assert code == 0 and err == ""  # same stack, verified base: nothing to warn about
    assert out.startswith("replayed steps 0..2 (3 steps)")
    assert _same_weights(run / "checkpoints" / "last", tmp_path / "rebuilt")
    header = TrajectoryLog(run / "trajectory.jsonl").header()
    assert (header.base.model_type, header.base.architectures) == ("llama", ["LlamaForCausalLM"])
    assert header.environment == describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def test_upto_must_be_a_logged_step(run, tiny_model_dir, tmp_path, capsys):
    log = run / "trajectory.jsonl"
    for upto in ("-5", "3"):
        assert "outside the logged steps 0..2" in _refused(capsys, tiny_model_dir, log, "--output", tmp_path / "o",
                                                           "--upto", upto)
    assert not (tmp_path / "o").exists()
    code, out, _ = _replay(capsys, tiny_model_dir, log, "--output", tmp_path / "o", "--upto", "1")
    assert code == 0 and out.startswith("replayed steps 0..1 (2 steps)")
    assert json.loads((tmp_path / "o" / "distzo_state.json").read_text())["step"] == 2
    assert not _same_weights(run / "checkpoints" / "last", tmp_path / "o")


def test_skipped_steps_replay(tiny_model_dir, sst2_dir, tmp_path, monkeypatch, capsys):
    out = _train(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "2")
    monkeypatch.setattr("distzo.trainer.default_loss", lambda logits, batch: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="non-finite loss"):
        _train(tiny_model_dir, sst2_dir, out, "--steps", "4", "--max_skipped_steps", "5", "--resume")
    assert [r["skipped"] for r in TrajectoryLog(out / "trajectory.jsonl").read()] == [False, False, True, True]
    code, text, _ = _replay(capsys, tiny_model_dir, out / "trajectory.jsonl", "--output", tmp_path / "rebuilt")
    assert code == 0 and text.startswith("replayed steps 0..3 (4 steps)")
    assert _same_weights(out / "checkpoints" / "last", tmp_path / "rebuilt")


# --------------------------------------------------------------------------- the output folder


def test_a_non_empty_output_needs_overwrite(run, tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    log = run / "trajectory.jsonl"
    assert "not empty; pass --overwrite" in _refused(capsys, tiny_model_dir, log, "--output", target)
    assert _snapshot(target) == {"notes.txt": b"mine"}
    assert _replay(capsys, tiny_model_dir, log, "--output", target, "--overwrite")[0] == 0
    assert not (target / "notes.txt").exists() and _same_weights(run / "checkpoints" / "last", target)
    assert "not empty" in _refused(capsys, tiny_model_dir, log, "--output", target)  # a replay's output too
    assert _replay(capsys, tiny_model_dir, log, "--output", target, "--overwrite")[0] == 0


def test_never_writes_into_a_run_or_its_checkpoints(run, tiny_model_dir, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "run")
    (tmp_path / "link").symlink_to(copy / "checkpoints" / "last")
    before = _snapshot(copy)
    targets = {copy / "checkpoints" / "last": "checkpoints of the run", copy / "checkpoints": "checkpoints of the run",
               copy / "checkpoints" / "new": "checkpoints of the run", tmp_path / "link": "checkpoints of the run",
               copy: "would replace the training run", tmp_path: "would replace the training run"}
    for target, reason in targets.items():  # the log given lies elsewhere: the folders alone are refused
        err = _refused(capsys, tiny_model_dir, run / "trajectory.jsonl", "--output", target, "--overwrite")
        assert reason in err and "even with --overwrite" in err, err
    assert _snapshot(copy) == before  # optimizer.json included: --resume still works
    assert not (copy / "checkpoints" / "new").exists()


def test_never_replaces_a_checkpoint_of_training(run, tiny_model_dir, tmp_path, capsys):
    kept = shutil.copytree(run / "checkpoints" / "last", tmp_path / "kept" / "final")
    before = _snapshot(tmp_path / "kept")
    log = run / "trajectory.jsonl"
    for target in (kept, kept / "sub", tmp_path / "kept"):
        assert "training checkpoint" in _refused(capsys, tiny_model_dir, log, "--output", target, "--overwrite")
    assert _snapshot(tmp_path / "kept") == before


def test_never_writes_over_the_base_or_the_log(run, tiny_model_dir, tmp_path, capsys):
    base = shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    (tmp_path / "logs").mkdir()
    log = shutil.copy(run / "trajectory.jsonl", tmp_path / "logs" / "my.jsonl")
    before = _snapshot(tmp_path)
    for target, what in ((base, "the base model"), (base / "rebuilt", "the base model"),
                         (tmp_path / "models", "the base model"), (tmp_path / "logs", "the trajectory log")):
        assert f"overlaps {what}" in _refused(capsys, base, log, "--output", target, "--overwrite")
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- the base


def _variant(folder: Path, tokenizer_dir: Path, model_cls, config) -> Path:
    torch.manual_seed(1)
    model_cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, reason", [
    ("architecture", "its architecture is mistral ['MistralForCausalLM'], the log's base is llama"),
    ("size", "its trainable parameters (names, shapes or dtypes) differ"),
    ("weights", "its weights differ from those of the log's base"),
])
def test_a_base_other_than_the_logs_is_refused(run, tiny_model_dir, tmp_path, capsys, kind, reason):
    model_cls, config = {"architecture": (MistralForCausalLM, MistralConfig(**TINY)),
                         "size": (LlamaForCausalLM, LlamaConfig(**{**TINY, "intermediate_size": 48})),
                         "weights": (LlamaForCausalLM, LlamaConfig(**TINY))}[kind]
    other = _variant(tmp_path / "other", tiny_model_dir, model_cls, config)
    err = _refused(capsys, other, run / "trajectory.jsonl", "--output", tmp_path / "rebuilt")
    assert "is not the base model of this log's run" in err and reason in err, err
    assert not (tmp_path / "rebuilt").exists()


def test_a_lora_run_checks_its_frozen_base(tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = _train(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "2", "--lora", "true", "--lr", "1e-1")
    other = _variant(tmp_path / "other", tiny_model_dir, LlamaForCausalLM, LlamaConfig(**TINY))
    assert "its weights differ" in _refused(capsys, other, out / "trajectory.jsonl", "--output", tmp_path / "o")
    assert _replay(capsys, tiny_model_dir, out / "trajectory.jsonl", "--output", tmp_path / "o")[0] == 0
    assert _same_weights(out / "checkpoints" / "last", tmp_path / "o")


def test_an_older_log_replays_with_a_warning(run, tiny_model_dir, tmp_path, capsys):
    def older(lines):  # as written before the base, the environment and string seeds
        header = {k: v for k, v in lines[0]["header"].items() if k not in ("base", "environment")}
        return [{"header": header}, *({**r, "seeds": [int(s) for s in r["seeds"]]} for r in lines[1:])]

    log = _rewrite(run / "trajectory.jsonl", tmp_path / "old.jsonl", older)
    code, out, err = _replay(capsys, tiny_model_dir, log, "--output", tmp_path / "rebuilt")
    assert code == 0 and out.startswith("replayed steps 0..2 (3 steps)")
    assert err.startswith("distzo: warning: ") and err.count("\n") == 1 and "could not be verified" in err, err
    assert _same_weights(run / "checkpoints" / "last", tmp_path / "rebuilt")


def test_another_stack_gets_a_note(run, tiny_model_dir, tmp_path, capsys):
    def elsewhere(lines):
        lines[0]["header"]["environment"] |= {"torch": "1.0.0", "device": "NVIDIA H200"}
        return lines

    log = _rewrite(run / "trajectory.jsonl", tmp_path / "t.jsonl", elsewhere)
    code, _, err = _replay(capsys, tiny_model_dir, log, "--output", tmp_path / "rebuilt")
    assert code == 0 and err.startswith("distzo: warning: ") and err.count("\n") == 1, err
    assert "torch 1.0.0 -> " in err and "bit-exactness is promised only on the same versions and device kind" in err


# --------------------------------------------------------------------------- the log


@pytest.mark.parametrize("edit, reason", [
    (lambda lines: [lines[0], *lines[2:]], "starts at step 1, not 0"),
    (lambda lines: [*lines[:2], lines[3]], "after step 0 comes step 2 (steps 1..1 are missing)"),
    (lambda lines: [*lines[:3], lines[2], lines[3]], "after step 1 comes step 1 again"),
    (lambda lines: [*lines, *lines], "line 5 is a second header"),
    (lambda lines: lines[:1], "no steps to replay"),
])
def test_a_damaged_log_is_refused(run, tiny_model_dir, tmp_path, capsys, edit, reason):
    log = _rewrite(run / "trajectory.jsonl", tmp_path / "t.jsonl", edit)
    assert reason in _refused(capsys, tiny_model_dir, log, "--output", tmp_path / "rebuilt")
    assert not (tmp_path / "rebuilt").exists()


def test_events_are_not_gaps(run, tiny_model_dir, tmp_path, capsys):
    event = {"event": "extended", "step": 2, "steps_from": 2, "steps_to": 3}
    log = _rewrite(run / "trajectory.jsonl", tmp_path / "t.jsonl", lambda lines: [*lines[:3], event, lines[3]])
    code, out, _ = _replay(capsys, tiny_model_dir, log, "--output", tmp_path / "rebuilt")
    assert code == 0 and out.startswith("replayed steps 0..2 (3 steps)")
    assert _same_weights(run / "checkpoints" / "last", tmp_path / "rebuilt")


def test_an_offloaded_run_has_the_same_base_and_replays(run, tiny_model_dir, sst2_dir, tmp_path, capsys):
    out = _train(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "3", "--offload", "cpu")
    assert TrajectoryLog(out / "trajectory.jsonl").header().base == TrajectoryLog(run / "trajectory.jsonl").header().base
    assert _replay(capsys, tiny_model_dir, out / "trajectory.jsonl", "--output", tmp_path / "rebuilt")[0] == 0
    assert _same_weights(out / "checkpoints" / "last", tmp_path / "rebuilt")


# --------------------------------------------------------------------------- logs of earlier versions

LEGACY_LOG = Path(__file__).parent / "data" / "trajectory_v1.jsonl"
# sha256 of the weights that distzo's replay built from LEGACY_LOG before update records existed
# (q = 2, weight decay, a skipped step; Rademacher directions, so every value is exact on any CPU).
LEGACY_DIGESTS = {
    torch.bfloat16: "816fd0e91d18b210107e0c08f6f20ec919184803bdbeb7e2465008b07c8c1715",
    torch.float32: "790eb6cc3102cfc7aff3b095f3af13161e11c4deeb076cb4704e6a8ab8c55342",
}


def _exact_base(dtype):
    """A tiny Llama whose weights are Rademacher signs / 32: the same bits on every machine."""
    model = tiny_model("llama", dtype=dtype)
    with torch.no_grad():
        for p in trainable_params(model):
            p.param.copy_(directions.direction_like(p.param.float(), 99, p.key, "rademacher") / 32)
    return model


def _digest(model) -> str:
    h = hashlib.sha256()
    for p in trainable_params(model):
        h.update(p.name.encode())
        h.update(p.param.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_log_of_the_previous_format_replays_to_the_same_weights(dtype):
    log = TrajectoryLog(LEGACY_LOG)
    model = _exact_base(dtype)
    replay_into(model, log.header(), log.read())
    assert _digest(model) == LEGACY_DIGESTS[dtype]
