"""Output places that cannot be written: refused before any work, or said as the user's problem, not as a bug."""

import errno
import tempfile

import pytest

from posttrain.cli import main
from posttrain.cli.output import check_output_file, check_output_folder
from posttrain.errors import UserError


def test_an_output_on_a_read_only_place_is_refused_before_any_work(tmp_path, monkeypatch):
    """`evaluate --out` on a read-only file system failed after every answer was generated and scored, with a
    traceback and no results shown (an audit); `data make`, `data pairs` and `merge` alike."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(UserError, match=r"--out .*answers.jsonl: .* cannot be written into \(Read-only file system\)"):
        check_output_file(str(tmp_path / "answers.jsonl"), "--out")
    with pytest.raises(UserError, match=r"cannot be written into \(Read-only file system\); choose a folder"):
        check_output_folder(str(tmp_path / "new" / "merged"), "--out")  # the nearest existing folder is checked
    monkeypatch.undo()
    check_output_file(str(tmp_path / "answers.jsonl"), "--out")  # a writable place passes, and nothing is left
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_the_users_problem_with_the_file_named_and_no_temporary_file_left(tmp_path, monkeypatch, capsys):
    """A full disk while `data make` wrote its rows: a traceback and "a bug in posttrain" (exit 1), and an empty
    or half file left under the name a later command reads."""
    from pathlib import Path

    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            f.write("half")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return f

    monkeypatch.setattr(Path, "open", full)
    code = main(["data", "make", "arithmetic", "--n", "4", "--out", str(tmp_path / "rows.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "bug" not in err
    assert "error: No space left on device: " in err and "free some space" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor a hidden temporary one
