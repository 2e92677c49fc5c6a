"""``--push-to-hub``: the run's best or last checkpoint uploaded to a Hub model repo at its end.

The upload comes after the run's own files are complete, so a failed upload (offline, no token,
no write access) loses nothing: it ends with one line that says how to retry by hand.
"""

from __future__ import annotations

from pathlib import Path

from distzo.checkpoint import is_complete


class UploadFailed(OSError):
    """The run finished, its checkpoint did not reach the Hub."""


def push(folder: Path, repo: str) -> str:
    """Upload the checkpoint ``folder`` to the model repo ``repo`` (created if missing); the repo's URL."""
    from huggingface_hub import HfApi

    if not is_complete(folder):
        raise UploadFailed(f"the run is complete, but {folder} holds no checkpoint to upload to {repo}")
    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        message = f"distzo: the {folder.name} checkpoint"
        commit = api.upload_folder(repo_id=repo, folder_path=folder, commit_message=message)
    except Exception as exc:  # noqa: BLE001 - offline, no token, no access, network: its message says which
        # The retry comes first: an error line shows the first line of the message alone.
        raise UploadFailed(f"the run is complete, but uploading {folder} to {repo} failed (retry with: hf upload "
                           f"{repo} {folder}): {str(exc).strip() or type(exc).__name__}") from exc
    return str(commit.repo_url)
