"""The quickstart's cached base-model scores (`evaluation.cache`): reused only for the same model files, held-out
rows and decoding settings; an unreadable cache file is scored again with a warning."""

import json
import shutil
from types import SimpleNamespace

import pytest

from posttrain import quickstart
from posttrain.evaluation.cache import decoding_settings, lookup, scores_key, write_scores
from posttrain.trainer.fingerprint import file_digest

SCORES = {"n": 2.0, "exact": 0.5}


@pytest.fixture()
def parts(tiny_dir, tmp_path):
    """A model folder and a held-out file of this test's own (the test changes their bytes)."""
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    rows = tmp_path / "data" / "heldout.jsonl"
    rows.parent.mkdir()
    rows.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n', encoding="utf-8")
    return model, rows


def _key(model, rows, **decoding):
    return scores_key(str(model), rows, decoding_settings(**{"max_new_tokens": 96, "batch_size": 16, **decoding}))


def test_same_files_and_settings_hit(parts, tmp_path):
    model, rows = parts
    cache = tmp_path / "eval_base.json"
    assert lookup(cache, _key(model, rows)) == (None, "no cached scores yet")
    write_scores(cache, _key(model, rows), SCORES)
    assert lookup(cache, _key(model, rows)) == (SCORES, None)
    saved = json.loads(cache.read_text(encoding="utf-8"))
    assert saved["made_from"]["model"]["sha256"] == file_digest(model)
    assert saved["made_from"]["rows"]["sha256"] == file_digest(rows)
    # where the files are is no part of the key: the same bytes elsewhere (a moved run folder) still hit
    moved = shutil.copy(rows, tmp_path / "moved.jsonl")
    assert lookup(cache, _key(model, moved)) == (SCORES, None)


@pytest.mark.parametrize(
    "change, reason",
    [
        ("model", "the model files changed since they were cached"),
        ("rows", "the held-out rows changed since they were cached"),
        ("max_new_tokens", "the decoding settings changed since they were cached"),
        ("batch_size", "the decoding settings changed since they were cached"),
        ("temperature", "the decoding settings changed since they were cached"),
        ("dtype", "the decoding settings changed since they were cached"),
    ],
)
def test_any_changed_part_misses(parts, tmp_path, change, reason):
    model, rows = parts
    cache = tmp_path / "eval_base.json"
    write_scores(cache, _key(model, rows), SCORES)
    decoding = {}
    if change == "model":  # one byte of one file of the folder (here the tokenizer's)
        tok = model / "tokenizer_config.json"
        tok.write_text(tok.read_text(encoding="utf-8") + " ", encoding="utf-8")
    elif change == "rows":
        rows.write_text(rows.read_text(encoding="utf-8") + '{"prompt": "c", "answer": 3}\n', encoding="utf-8")
    else:
        decoding = {"max_new_tokens": 95, "batch_size": 8, "temperature": 0.7, "dtype": "bfloat16"}[change]
        decoding = {change: decoding}
    assert lookup(cache, _key(model, rows, **decoding)) == (None, reason)


def test_scores_decoded_on_another_machine_miss(parts, tmp_path, monkeypatch):
    """Another CPU instruction set (AVX2 against AVX-512 kernels sum in other orders) or a GPU decodes other
    greedy answers now and then: a run folder moved to such a machine scores its base model again."""
    import torch

    model, rows = parts
    cache = tmp_path / "eval_base.json"
    write_scores(cache, _key(model, rows), SCORES)
    made = json.loads(cache.read_text(encoding="utf-8"))["made_from"]["decoding"]
    assert made["device"] == "cpu" and made["dtype"] == "float32"
    assert made["cpu"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "another")
    assert lookup(cache, _key(model, rows)) == (None, "the decoding settings changed since they were cached")


@pytest.mark.parametrize(
    "content",
    ['{"scores": {"n": 2.0, "exa', "[1, 2]", json.dumps({"scores": SCORES}), json.dumps({"scores": [1], "made_from": {}}),
     b"\xff\xfe"],
    ids=["cut-mid-write", "not-an-object", "no-made-from", "bad-made-from", "not-utf8"],
)
def test_an_unreadable_cache_is_a_miss_with_a_warning(parts, tmp_path, capsys, content):
    model, rows = parts
    cache = tmp_path / "eval_base.json"
    cache.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert lookup(cache, _key(model, rows)) == (None, "the cached file was unreadable")
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {cache} cannot be read as cached scores (") and "scoring again" in err


def test_old_flat_scores_are_a_quiet_miss(parts, tmp_path, capsys):
    """An eval_base.json of an older quickstart (the scores alone) is scored again, without a warning."""
    model, rows = parts
    cache = tmp_path / "eval_base.json"
    cache.write_text(json.dumps(SCORES), encoding="utf-8")
    assert lookup(cache, _key(model, rows)) == (
        None, "the cached scores do not say what made them (written by an older posttrain)"
    )
    assert capsys.readouterr().err == ""


def test_quickstart_scores_the_base_model_once(parts, tmp_path, monkeypatch, capsys):
    """`quickstart._base_scores`: scored on the first call, read back on the second; scored again when a key part
    changed or the file is corrupt (then written anew, so the next call hits)."""
    model, rows = parts
    calls = []

    def fake_evaluate(m, tokenizer, task, *, rows, max_new_tokens, batch_size, per_row):
        calls.append((task, len(rows), max_new_tokens, batch_size))
        return {"n": float(len(rows)), "exact": 0.25 * len(calls)}

    monkeypatch.setattr(quickstart, "evaluate_task", fake_evaluate)
    cfg = SimpleNamespace(model=SimpleNamespace(name=str(model)))
    recipe = quickstart.SFTRecipe(task="structured", n_train=4, n_eval=2, max_new_tokens=96, eval_batch_size=16)
    heldout = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    cache = tmp_path / "eval_base.json"

    def scores(r=recipe):
        return quickstart._base_scores(cfg, None, r, heldout, rows, cache)

    assert scores() == {"n": 2.0, "exact": 0.25} and calls == [("structured", 2, 96, 16)]
    assert scores() == {"n": 2.0, "exact": 0.25} and len(calls) == 1  # reused: no second evaluation
    assert "base-model scores reused from" in capsys.readouterr().out
    wider = quickstart.SFTRecipe(**{**recipe.__dict__, "eval_batch_size": 32})
    assert scores(wider) == {"n": 2.0, "exact": 0.5} and calls[-1] == ("structured", 2, 96, 32)
    assert "(greedy; the decoding settings changed since they were cached)" in capsys.readouterr().out
    cache.write_text("{", encoding="utf-8")
    assert scores(wider) == {"n": 2.0, "exact": 0.75} and len(calls) == 3
    assert "cannot be read as cached scores" in capsys.readouterr().err
    assert scores(wider) == {"n": 2.0, "exact": 0.75} and len(calls) == 3  # the rewritten file hits


def test_an_upgrade_that_scores_otherwise_scores_again(parts, tmp_path, monkeypatch):
    """The key held no posttrain version and no verifier: after an upgrade that changed how a task scores, "before"
    was the old verifier's and "after" the new one's."""
    import importlib.metadata

    model, rows = parts
    cache = tmp_path / "eval_base.json"
    write_scores(cache, _key(model, rows, task="structured"), SCORES)
    assert lookup(cache, _key(model, rows, task="structured")) == (SCORES, None)
    assert lookup(cache, _key(model, rows, task="arithmetic"))[1] == "the decoding settings changed since they were cached"
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "posttrain" else real(name))
    assert lookup(cache, _key(model, rows, task="structured"))[0] is None


def test_any_change_of_posttrains_code_scores_again(parts, tmp_path, monkeypatch):
    """The version stayed 0.1.0 while the code changed: a `pair_accuracy` that counted ties otherwise reused the
    old scores as "before" (an audit). The key holds the digest of every .py file of the package."""
    from posttrain.evaluation import cache as cache_module

    model, rows = parts
    cache = tmp_path / "eval_base.json"
    write_scores(cache, _key(model, rows, task="structured"), SCORES)
    assert lookup(cache, _key(model, rows, task="structured")) == (SCORES, None)
    digest = cache_module.code_digest.__wrapped__  # uncached
    assert digest() == cache_module.code_digest() and len(digest()) == 64
    monkeypatch.setattr(cache_module, "code_digest", lambda: "0" * 64)
    assert lookup(cache, _key(model, rows, task="structured"))[1] == "the decoding settings changed since they were cached"
    # the digest: files by their place in the package and their bytes; one byte anywhere changes it
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    first = digest(package)
    (package / "sub" / "b.py").write_text("y = 3\n")
    edited = digest(package)
    assert edited != first
    (package / "sub" / "b.py").rename(package / "b.py")  # the same bytes elsewhere: other code
    assert digest(package) != edited


def test_the_recipes_base_scores_are_keyed_as_the_quickstarts(parts, tmp_path, monkeypatch):
    """The DPO/GRPO/PPO/RLOO recipes reused eval_base.json whenever it existed: another model, other held-out rows
    or other evaluation settings got the first run's scores (then `paired_change` failed on their counts)."""
    from posttrain import recipes

    model, rows = parts
    calls = []
    monkeypatch.setattr(recipes, "load_model", lambda *a, **k: "a model")
    monkeypatch.setattr(recipes, "_scores", lambda *a, **k: calls.append(1) or {"n": 2.0, "correct": 0.5})

    def scores(name, temperature=0.7):
        cfg = SimpleNamespace(model=SimpleNamespace(name=str(name)), data=SimpleNamespace(max_length=64))
        recipe = SimpleNamespace(eval={"max_new_tokens": 8, "batch_size": 4, "temperature": temperature})
        return recipes._base_scores(cfg, None, recipe, {"heldout": rows}, 2, tmp_path / "eval_base.json")

    assert scores(model) == {"n": 2.0, "correct": 0.5} and len(calls) == 1
    scores(model)
    assert len(calls) == 1  # the same: reused
    scores(model, temperature=1.0)
    assert len(calls) == 2  # other evaluation settings: scored again
    other = shutil.copytree(model, tmp_path / "other")
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:-8] + bytes(8))
    scores(other, temperature=1.0)
    assert len(calls) == 3  # another model's files: scored again
    (tmp_path / "eval_base.json").write_text('{"scores": {"n"')  # cut by a kill: scored again, not a crash
    scores(other, temperature=1.0)
    assert len(calls) == 4
