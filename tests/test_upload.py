"""--push-to-hub: the finished run's checkpoint goes to the Hub; offline, one line says how to retry."""

import json
import types
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from test_trainer import _args

from distzo.checkpoint import is_complete
from distzo.cli import main

REPO = "someone/tiny-sst2"


@pytest.fixture()
def run(tiny_model_dir, sst2_dir, tmp_path):
    return lambda *extra: _args(tiny_model_dir, sst2_dir, tmp_path / "run", "--steps", "4", "--zero_shot", "false",
                                "--push-to-hub", REPO, *extra)


@pytest.fixture()
def uploads(monkeypatch):
    """The Hub calls, recorded instead of sent: (method, arguments, files of the folder at upload)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}, None))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        calls.append(("upload_folder", kwargs, {p.name: p.read_bytes() for p in folder.iterdir()}))
        return types.SimpleNamespace(repo_url=f"https://huggingface.co/{kwargs['repo_id']}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.mark.parametrize("which,extra", [("last", ()), ("best", ("--push-checkpoint", "best", "--eval-every", "2"))])
def test_the_chosen_checkpoint_is_uploaded_with_its_card(run, tmp_path, capsys, uploads, which, extra):
    assert main(run(*extra)) == 0
    folder = tmp_path / "run" / "checkpoints" / which
    (create, created, _), (upload, uploaded, files) = uploads
    assert (create, created["repo_id"], created["exist_ok"]) == ("create_repo", REPO, True)
    assert (upload, uploaded["repo_id"], Path(uploaded["folder_path"])) == ("upload_folder", REPO, folder)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert "distzo" in card.data.tags and f'from_pretrained("{REPO}")' in card.text
    assert f"uploaded {folder} to https://huggingface.co/{REPO}" in capsys.readouterr().out


def test_offline_the_upload_fails_in_one_line_after_the_run_is_complete(run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run()) == 2  # tests run with HF_HUB_OFFLINE=1: huggingface_hub refuses to connect
    err = capsys.readouterr().err.strip()
    last = out / "checkpoints" / "last"
    assert "\n" not in err and err.startswith(f"distzo: error: the run is complete, but uploading {last} to {REPO} "
                                              f"failed (retry with: hf upload {REPO} {last}): "), err
    assert "offline mode is enabled" in err
    assert json.loads((out / "results.json").read_text())["steps"] == 4 and is_complete(last)
    assert (last / "README.md").is_file()


@pytest.mark.parametrize("flags,message", [
    (("--push-to-hub", "not a repo"), "push_to_hub 'not a repo' is not a Hub repo id (user/name)"),
    (("--push-to-hub", REPO, "--push-checkpoint", "best"), "push_checkpoint best needs eval_every > 0"),
    (("--push-to-hub", REPO, "--push-checkpoint", "first"), "push_checkpoint must be best or last, got 'first'"),
])
def test_bad_push_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), *flags]) == 2
    assert message in capsys.readouterr().err and not out.exists()
