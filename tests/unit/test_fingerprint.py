"""The run folder's record of its data: the same bytes pass, any change is refused naming the file."""

import hashlib
from types import SimpleNamespace

import pytest

from posttrain.errors import ConfigError
from posttrain.trainer.fingerprint import (
    check_same_data,
    check_same_plan,
    data_fingerprint,
    file_digest,
    read_fingerprint,
    write_fingerprint,
)


def test_a_file_is_its_bytes_and_a_folder_its_files_names_and_bytes(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n')
    assert file_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"\x00\x01")
    (folder / "dataset_dict.json").write_text("{}")
    first = file_digest(folder)
    (folder / "train" / "data.arrow").write_bytes(b"\x00\x02")
    second = file_digest(folder)
    (folder / "train" / "data.arrow").rename(folder / "train" / "other.arrow")
    assert len({first, second, file_digest(folder)}) == 3


def test_resume_on_other_data_is_refused_naming_the_file(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("1\n")
    held.write_text("2\n")
    cfg = SimpleNamespace(data=SimpleNamespace(train=str(train), eval=str(held)))
    run = tmp_path / "run"
    run.mkdir()
    write_fingerprint(run, data_fingerprint(cfg), steps_per_epoch=5)
    recorded = read_fingerprint(run)
    check_same_data(run, recorded, data_fingerprint(cfg))  # unchanged: nothing raised
    held.write_text("2 \n")
    with pytest.raises(ConfigError, match=rf"--resume: data.eval \({held}\) changed since"):
        check_same_data(run, recorded, data_fingerprint(cfg))
    check_same_plan(run, recorded, 5)
    with pytest.raises(ConfigError, match="started with 5 steps per epoch and this run would have 6"):
        check_same_plan(run, recorded, 6)
    assert read_fingerprint(tmp_path) is None  # a run folder from before fingerprints: nothing to compare


def test_the_weights_digest_reads_the_files_a_model_is_loaded_from(tmp_path):
    """A hub snapshot that gained a pytorch_model.bin beside its model.safetensors (a whole-repo download) read as
    other weights: a false "base changed" warning, and a resume or a data pairs re-run refused (a review)."""
    from posttrain.files import weights_digest

    (tmp_path / "model.safetensors").write_bytes(bytes(300_000))
    before = weights_digest(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert weights_digest(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(bytes(299_999) + b"x")
    assert weights_digest(tmp_path) != before


def test_a_reward_file_not_found_on_resume_is_left_to_the_loader_to_say(tmp_path):
    """A relative reward path resumed from another folder was called "rewritten" (a review): not found now, it is
    the reward loader's "not found (a relative path is read from ...)" that the user needs."""
    from posttrain.trainer.fingerprint import check_same_inputs

    recorded = {"algorithm.rewards[0] file": {"path": "/a/rewards.py", "sha256": "1" * 64},
                "model.name tokenizer": {"path": "/m", "sha256": "3" * 64}}  # fmt: skip
    assert check_same_inputs(tmp_path, recorded, {}) is None  # not found now: not said here
    note = check_same_inputs(tmp_path, recorded, {"algorithm.rewards[0] file": {"path": "/a/rewards.py",
                                                                                "sha256": "2" * 64}})  # fmt: skip
    assert note.startswith("warning: the reward file of algorithm.rewards[0] (/a/rewards.py) changed")
    with pytest.raises(ConfigError, match=r"the tokenizer or chat template files of model.name \(/m\) changed"):
        check_same_inputs(tmp_path, recorded, {"model.name tokenizer": {"path": "/m", "sha256": "4" * 64}})


def test_a_run_fingerprinted_before_the_digest_read_only_loaded_files_still_resumes(tmp_path):
    """A model folder with a .bin beside its safetensors (an HF Trainer checkpoint's training_args.bin) was digested
    whole before; its digest now reads the safetensors only, and a resume of such a run was refused (a review)."""
    from posttrain.files import weights_digest
    from posttrain.trainer.fingerprint import check_same_weights

    (tmp_path / "model.safetensors").write_bytes(bytes(300_000))
    (tmp_path / "training_args.bin").write_bytes(b"args")
    old = {"model.name": {"path": str(tmp_path), "sha256": weights_digest(tmp_path, loaded_only=False)}}
    now = {"model.name": {"path": str(tmp_path), "sha256": weights_digest(tmp_path)}}
    assert old != now
    check_same_weights(tmp_path, old, now)  # the same weights: resumes
    (tmp_path / "model.safetensors").write_bytes(bytes(299_999) + b"x")
    now = {"model.name": {"path": str(tmp_path), "sha256": weights_digest(tmp_path)}}
    with pytest.raises(ConfigError, match="the weights of model.name"):
        check_same_weights(tmp_path, old, now)
