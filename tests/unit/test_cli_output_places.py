"""Output places that cannot be written: refused before any work, or said as the user's problem, not as a bug."""

import errno
import tempfile
from pathlib import Path

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


def test_an_existing_output_folder_is_itself_checked(tmp_path, monkeypatch):
    """An existing --out folder that could not be written passed (only its parent was probed): `diagnose` measured
    everything, then failed to write its report (a review)."""
    real = tempfile.NamedTemporaryFile
    folder = tmp_path / "results"
    folder.mkdir()

    def read_only_inside(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only_inside)
    with pytest.raises(UserError, match=r"results: .*results cannot be written into \(Read-only file system\)"):
        check_output_folder(str(folder), "--out")


def test_a_write_error_that_names_no_file_is_given_the_file_it_was_writing():
    """`write()` on a full disk raises an OSError with no file name: the error said "No space left on device" and
    not where (a review)."""
    from posttrain.files import naming

    with pytest.raises(OSError) as err, naming("/data/run/metrics.jsonl"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.filename == "/data/run/metrics.jsonl" and err.value.errno == errno.ENOSPC


def test_only_a_full_disk_or_an_opaque_write_error_on_a_nearly_full_one_is_called_a_full_disk(tmp_path, monkeypatch):
    """Any failed save was called "the disk is full" under 16 MB free (a tmpfs, /dev/shm), its own error dropped (a
    review): only errors that say so, or torch's writer errors that name no cause, are put down to the disk."""
    import shutil
    from collections import namedtuple

    from posttrain.files import out_of_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(8 * 2**20, 7 * 2**20, 2**20))
    assert out_of_space(TypeError("a bug in the writer"), tmp_path) is None
    assert out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 75776 vs 75668"),
                        tmp_path).startswith("the disk is full (1.0 MB free")  # fmt: skip
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path).startswith("the disk is full")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**30, 2**39))
    assert out_of_space(RuntimeError("unexpected pos 75776 vs 75668"), tmp_path) is None  # room enough: not the disk


@pytest.mark.parametrize("argv", [
    ["train", "x.yaml"], ["generate", "--prompt", "hi"], ["evaluate", "--task", "arithmetic"], ["merge", "a", "--out", "b"],
    ["diagnose", "--task", "arithmetic"], ["data", "pairs", "--prompts", "p.jsonl", "--task", "arithmetic", "--out", "o.jsonl"],
])  # fmt: skip
def test_every_command_that_loads_a_model_stops_on_sigterm_as_on_ctrl_c(argv):
    """`data pairs` was left out (a review): SIGTERM killed it with no word and no --json document."""
    from posttrain.cli import build_parser

    assert build_parser().parse_args(argv).loads_models is True


@pytest.mark.parametrize("command", [["evaluate", "--task", "arithmetic"], ["generate", "--prompt", "hi"],
                                     ["diagnose", "--task", "arithmetic"]])  # fmt: skip
def test_a_second_model_is_refused_not_taken_in_place_of_the_first(command, capsys):
    """`evaluate --model A --model B` evaluated B alone, in a table whose layout suggests one column per model."""
    code = main([*command, "--model", "runs/a", "--model", "runs/b"])
    assert code == 2 and "--model was given twice ('runs/a', then 'runs/b')" in capsys.readouterr().err
