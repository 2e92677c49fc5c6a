"""What a refused command must look like: exit status 2 and one line on stderr."""

from __future__ import annotations

from distzo.cli import main


def refused(capsys, argv: list[str]) -> str:
    """Run ``distzo argv``; assert it was refused in one ``distzo: error:`` line, and return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distzo: error: ") and "\n" not in err, err
    return err
