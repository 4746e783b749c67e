"""Run config: YAML round trip, dotted overrides, and clear errors before any model loads."""

import re
from pathlib import Path

import pytest
import yaml

from posttrain.algorithms import RunConfig, load_config
from posttrain.config import apply_overrides, dump_config
from posttrain.errors import ConfigError


def test_defaults_and_overrides_have_their_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\ntechnique:\n  name: qlora\n")
    cfg = load_config(f, ["optim.lr=1e-4", "run.max_steps=7", "technique.target_modules=[q_proj, v_proj]"])
    assert cfg.optim.lr == 1e-4
    assert cfg.run.max_steps == 7
    assert cfg.technique.name == "qlora"
    assert cfg.technique.target_modules == ["q_proj", "v_proj"]


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(None, ["optim.batch_size=4", "data.train=x.jsonl"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert isinstance(yaml.safe_load((tmp_path / "config.yaml").read_text()), dict)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-4"], "optim.lr"),
        (["technique.r=0"], "technique.r"),
        (["optim.batch_size=0"], "optim.batch_size"),
        (["optim.l_r=3"], "optim.l_r: unknown key"),
        (["modle.name=x"], "modle: unknown key"),
        (["optim.lr=fast"], "optim.lr"),
        (["technique.name=sparse"], "technique.name"),
        (["optim.batch_size=8", "optim.micro_batch_size=3"], "not a multiple"),
        (["optim.batch_size=2", "optim.micro_batch_size=4"], "larger than"),
        (["data.max_length=4"], "data.max_length"),
        (["optim.head_lr=1e-3"], "optim.head_lr = 0.001 would be ignored"),
        (["optim.head_lr=0", "algorithm.name=reward"], "optim.head_lr"),
    ],
)
def test_impossible_values_are_clear_errors(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: 1e-4\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(f)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["optim.lr"])


CONFIGS = Path(__file__).parents[2] / "configs"


def test_the_example_configs_are_the_packages():
    """The repository's configs/ is the package's folder (a link), so the examples a clone shows and the ones an
    installed posttrain ships (the quickstart recipes read theirs there) are one set of files."""
    import posttrain

    assert CONFIGS.resolve() == (Path(posttrain.__file__).parent / "configs").resolve()
    assert (CONFIGS / "sft_lora.yaml").is_file() and (CONFIGS / "quickstart" / "sft.yaml").is_file()


def test_every_example_config_is_valid():
    from posttrain.rewards import build_reward_functions

    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs, "configs/ should hold example runs"
    for path in configs:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        if getattr(cfg.algorithm, "rewards", None):  # RL sections: reward names and args built here
            assert build_reward_functions(cfg.algorithm.rewards), path


@pytest.mark.parametrize("name", ["grpo_lora.yaml", "ppo_lora.yaml"])
def test_rl_example_configs_reward_the_prompts_their_header_makes(name, tmp_path):
    """The `posttrain data make ... --kind prompts` line in the header (run as written, into a temporary folder)
    writes rows that the config's rewards score: the task's own correct completions get 1.0 from every reward
    function (no fallback), so the total is the sum of the weights."""
    import json
    import shlex

    from posttrain.cli import main
    from posttrain.rewards import build_reward_functions, compute_rewards

    path = CONFIGS / name
    cfg = load_config(path)
    [line] = [ln for ln in path.read_text().splitlines() if ln.startswith("#") and "data make" in ln]
    argv = shlex.split(line.lstrip("# "))
    assert argv[:3] == ["posttrain", "data", "make"] and argv[argv.index("--kind") + 1] == "prompts"
    assert argv[argv.index("--out") + 1] == cfg.data.train
    out = tmp_path / "prompts.jsonl"
    argv[argv.index("--out") + 1], argv[argv.index("--n") + 1] = str(out), "6"
    assert main(argv[1:]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert argv[3] == "arithmetic" and all(r["metadata"]["task"] == "arithmetic" for r in rows)
    completions = [f"Answer: {r['answer']}" for r in rows]  # each prompt answered right, in the task's format
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    rewards = build_reward_functions(cfg.algorithm.rewards)
    result = compute_rewards(rewards, [r["prompt"] for r in rows], completions, columns)
    assert not any(result.failures.values()), result.errors
    assert all(v == [1.0] * 6 for v in result.per_function.values()), result.per_function
    assert result.total == [sum(r.weight for r in rewards)] * 6


def test_top_level_list_is_a_clear_error(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f, ["optim.lr=1e-4"])


def test_epochs_do_not_gain_a_step_from_float_rounding():
    from posttrain.data.order import total_steps

    assert total_steps(None, 0.07, 100) == 7


def test_head_lr_gives_the_scalar_head_its_own_rate_and_the_schedule_scales_it():

    from posttrain.models.heads import ScalarHeadModel
    from posttrain.testing import tiny_model
    from posttrain.trainer.optim import build_optimizer, build_scheduler

    model = ScalarHeadModel(tiny_model(), kind="value")
    cfg = load_config(None, ["algorithm.name=ppo", "algorithm.rewards=[task]", "optim.lr=1e-4",
                             "optim.head_lr=1e-2", "optim.weight_decay=0.1", "optim.schedule=linear",
                             "optim.warmup_steps=0"])  # fmt: skip
    opt = build_optimizer(model, cfg.optim)
    head = {id(model.head.weight), id(model.head.bias)}
    rates = {}
    for g in opt.param_groups:
        for p in g["params"]:
            rates[id(p)] = (g["lr"], g["weight_decay"])
    assert rates[id(model.head.weight)] == (1e-2, 0.1)
    assert rates[id(model.head.bias)] == (1e-2, 0.0)
    body = [r for k, r in rates.items() if k not in head]
    assert len(body) == sum(1 for p in model.parameters() if p.requires_grad) - 2
    assert {r[0] for r in body} == {1e-4}
    sched = build_scheduler(opt, cfg.optim, total_steps=4)
    opt.step()
    sched.step()  # linear decay: 3/4 of every group's peak after one of four steps
    by_lr = sorted({g["lr"] for g in opt.param_groups})
    assert by_lr == pytest.approx([0.75e-4, 0.75e-2])
    # Without head_lr every parameter shares `lr`.
    plain = build_optimizer(model, load_config(None, ["optim.lr=1e-4"]).optim)
    assert {g["lr"] for g in plain.param_groups} == {1e-4}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a leaf written twice in one section
        ("optim:\n  lr: 1.0e-4\n  batch_size: 4\n  lr: 2.0e-4\n", r"dup\.yaml:4: optim\.lr is given twice \(lines 2 and 4\)"),
        # a whole section written twice: the first would be dropped whole
        ("optim:\n  lr: 1.0e-4\nrun:\n  seed: 1\noptim:\n  batch_size: 4\n", r"dup\.yaml:5: optim is given twice \(lines 1 and 5\)"),
        # inside a reward spec, in a list
        ("algorithm:\n  name: grpo\n  rewards:\n    - task\n    - {name: length, weight: 1, weight: 2}\n",
         r"dup\.yaml:5: algorithm\.rewards\[1\]\.weight is given twice \(lines 5 and 5\)"),
    ],
)  # fmt: skip
def test_a_key_written_twice_in_a_run_file_is_an_error_naming_both_lines(tmp_path, text, expected):
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(f)


def test_each_field_error_names_the_line_that_set_it_or_the_override(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(
        "model:\n  name: m\n"  # 1-2
        "optim:\n  lr: fast\n  batch_size: 0\n  lr_schedul: cosine\n"  # 3-6
        "algorithm:\n  name: grpo\n  beta: -1\n  rewards:\n    - task\n"  # 7-11
        "technique:\n  head_lr: 3\n  target_modules: {q_proj: 1}\n"  # 12-14
    )
    with pytest.raises(ConfigError) as err:
        load_config(f, ["optim.batch_size=0"])
    lines = str(err.value).splitlines()
    assert lines[0] == f"{f}: invalid configuration:"
    assert "  optim.lr (line 4): should be a valid number, unable to parse string as a number (got 'fast')" in lines
    assert "  optim.batch_size (command line: optim.batch_size=0): should be greater than 0 (got 0)" in lines
    assert any(x.startswith("  optim.lr_schedul (line 6): unknown key; did you mean `optim.schedule`?") for x in lines)
    assert "  algorithm.beta (line 9): should be greater than or equal to 0 (got -1)" in lines
    # a location deeper than the file writes (pydantic's union member): the nearest key above it that it does
    assert "  technique.target_modules.str (line 14): should be a valid string" in lines
    # a shared section's field under another section says where it belongs
    assert any(x.startswith("  technique.head_lr (line 13): not a setting of `technique`; it belongs to `optim` "
                            "(optim.head_lr)") for x in lines)  # fmt: skip


def test_a_combination_error_is_led_by_the_line_or_override_of_the_field_it_names(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  batch_size: 8\n  micro_batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"\n  line 2: optim\.batch_size \(8\) is not a multiple of"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"\n  on the command line \(optim\.batch_size=6\): optim\.batch_size \(6\)"):
        load_config(f, ["optim.batch_size=6", "optim.micro_batch_size=4"])
    # the field the check names comes from the file, the one that broke it from the command line: both are said
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text("algorithm:\n  name: grpo\n  rewards: [task]\n  rollout:\n    batch_size: 32\n")
    with pytest.raises(ConfigError, match=r"\n  line 5: algorithm\.rollout\.batch_size \(32\) must be a multiple of "
                                          r"algorithm\.num_generations \(3\).* \(algorithm\.num_generations set on the "
                                          r"command line: algorithm\.num_generations=3\)"):
        load_config(grpo, ["algorithm.num_generations=3"])


def test_an_override_wins_over_the_file_and_a_repeated_override_takes_the_last_value(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n")
    assert load_config(f, ["optim.lr=1e-4", "optim.lr=3e-4"]).optim.lr == 3e-4


def test_a_mapping_override_sets_its_keys_and_a_new_name_replaces_the_section(tmp_path):
    """`optim={lr: 0.05}` replaced the whole section, dropping the file's batch size, silently; it now sets lr and
    keeps the rest, and an error in a key the file set names the file's line, not the override. A mapping that
    names another method replaces the section (its other keys belong to the method it had)."""
    f = tmp_path / "run.yaml"
    f.write_text("algorithm:\n  name: dpo\n  beta: 0.3\noptim:\n  lr: 1.0e-3\n  batch_size: 4\n  weight_decay: 0.3\n")
    cfg = load_config(f, ["optim={lr: 0.05}", "algorithm={loss_type: ipo}"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay) == (0.05, 4, 0.3)
    assert (cfg.algorithm.beta, cfg.algorithm.loss_type) == (0.3, "ipo")
    assert load_config(f, ["algorithm={name: sft}"]).algorithm.name == "sft"  # dpo's beta went with it
    # the same name, or one the file leaves to its default, merges; so does `model` (its name is a model, not a kind)
    f.write_text("technique:\n  r: 16\n  alpha: 64\nmodel:\n  gradient_checkpointing: true\n")
    cfg = load_config(f, ["technique={name: lora, r: 8}", "model={name: tiny-model}"])
    assert (cfg.technique.r, cfg.technique.alpha, cfg.model.gradient_checkpointing) == (8, 64, True)
    f.write_text("algorithm:\n  name: sft\n")  # what a replacing mapping leaves unset is blamed on it
    with pytest.raises(ConfigError, match=r"on the command line \(algorithm=\{name: grpo\}\)"):
        load_config(f, ["algorithm={name: grpo}"])
    f.write_text("optim:\n  lr: 1.0e-3\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"optim.batch_size \(line 3\): should be greater than 0"):
        load_config(f, ["optim={lr: 0.05}"])


def test_a_bare_off_for_model_dropout_means_off(tmp_path):
    """YAML reads `dropout: off` as false: it was refused with "should be 'auto', 'keep' or 'off' (got False)"."""
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  dropout: off\n", encoding="utf-8")
    assert load_config(run).model.dropout == "off"
    assert load_config(None, ["model.dropout=off"]).model.dropout == "off"
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(None, ["model.dropout=true"])


@pytest.mark.parametrize("override, says", [
    ("optim.lr=inf", "optim.lr: should be a finite number"),  # trained into a NaN loss at step 2, blamed on the data
    ("optim.max_grad_norm=.inf", "optim.max_grad_norm: should be a finite number"),
    ("run.epochs=inf", "run.epochs: should be a finite number"),  # OverflowError
    ("algorithm.reward_fallback=nan", "algorithm.reward_fallback: should be a finite number"),  # AttributeError
    ("run.output_dir=", "run.output_dir: String should have at least 1 character"),  # trained into the cwd
    ("technique.target_modules=q_proj(", "technique.target_modules: a single name is read as a regular expression"),
    ("technique.target_modules=[q_proj,", "the value is not a complete YAML list or mapping"),  # re.error before
    ("optim..lr=1", "the key 'optim..lr' has an empty part"),  # trained with optim.lr=1
    (".lr=1", "the key '.lr' has an empty part"),
])  # fmt: skip
def test_values_that_cannot_mean_anything_are_refused_before_anything_loads(override, says):
    """Each was accepted, or raised a traceback, before (an audit, nineteenth session)."""
    extra = ["algorithm.name=grpo", "algorithm.rewards=[task]"] if "reward_fallback" in override else []
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, [*extra, override])


def test_a_folder_or_a_deeply_nested_file_as_the_run_config(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a run config file"):
        load_config(tmp_path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="nested too deeply to read"):
        load_config(deep)


def test_a_target_modules_pattern_with_brackets_is_a_string():
    """`[qv]_proj` is a regular expression, not a list cut short (only unbalanced brackets are refused)."""
    assert load_config(None, ["technique.target_modules=[qv]_proj"]).technique.target_modules == "[qv]_proj"


HELP = " (`posttrain train --help-config` lists every field)"


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        # another tool's name: its meaning, wherever it was written (difflib said `data.train_on` here)
        (["data.train_file=x.jsonl"], "data.train_file: unknown key; did you mean `data.train`?" + HELP),
        (["train_file=x.jsonl"], "train_file: unknown key; did you mean `data.train`?" + HELP),
        (["optim.learning_rate=1e-4"], "optim.learning_rate: unknown key; did you mean `optim.lr`?" + HELP),
        (["run.max_seq_length=256"], "run.max_seq_length: unknown key; did you mean `data.max_length`?" + HELP),
        (["model_name_or_path=m"], "model_name_or_path: unknown key; did you mean `model.name`?" + HELP),
        (["technique.lora_r=8"], "technique.lora_r: unknown key; did you mean `technique.r`?" + HELP),
        (["optim.warmup_ratio=0.1"],
         "optim.warmup_ratio: unknown key; posttrain has optim.warmup_steps only, a number of steps: a ratio of 0.1 "
         "over a 500-step run is optim.warmup_steps=50" + HELP),
        (["gradient_accumulation_steps=4"],
         "gradient_accumulation_steps: unknown key; posttrain accumulates micro-batches itself: optim.batch_size is "
         "the examples per optimisation step over all processes, optim.micro_batch_size the examples per forward pass "
         "per process, and the micro-batches accumulated per step follow (batch_size / (micro_batch_size x "
         "processes)); set those two instead" + HELP),
        # one of our own fields at the top level: its section
        (["lr=1e-4"], "lr: not a top-level key; it belongs to `optim` (optim.lr)" + HELP),
        # the rest still goes to difflib
        (["data.trian=x.jsonl"], "data.trian: unknown key; did you mean `data.train`?" + HELP),
    ],
)  # fmt: skip
def test_an_unknown_key_in_another_tools_name_suggests_the_setting_it_means(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).splitlines() == ["command line: invalid configuration:", f"  {line}"]


def test_every_setting_another_tools_name_points_to_exists():
    """A suggestion names a field `--help-config` lists (the advice sentences too: every dotted name in them)."""
    from posttrain.config import describe_fields
    from posttrain.config_names import ADVICE, OTHER_NAMES

    fields = {row[0] for row in describe_fields(RunConfig)}
    named = set(OTHER_NAMES.values()) | {m for text in ADVICE.values() for m in re.findall(r"\b[a-z]+\.[a-z_]+", text)}
    assert named - fields == set()
    # and none is one of our own field names but seed and output_dir (given by the audit): those written under the
    # wrong section are said to belong to theirs ("not a setting of `optim`; it belongs to `run`")
    assert not set(OTHER_NAMES) & {name.rsplit(".", 1)[-1] for name in fields} - {"seed", "output_dir"}


def test_a_section_or_a_list_given_one_value_says_what_to_write(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: tiny\ndata:\nalgorithm:\n  name: grpo\n  rewards: numeric_answer\n  rollout: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value).splitlines()[1:] == [
        "  model (line 1): model is a section, not a value: did you mean model.name: tiny (command line: "
        "model.name=tiny)?",
        "  data (line 2): data is a section, and it is empty here: give its fields under it (train, eval, max_length, "
        "train_on, packing, share_prompt, shuffle, columns, ignore_columns, message_keys, roles, turns, skip_bad_rows, chat_template_kwargs), or remove it",
        "  algorithm.rewards (line 5): must be a list: 'algorithm.rewards=[numeric_answer]' (YAML: rewards: "
        "[numeric_answer])",
        "  algorithm.rollout (line 6): algorithm.rollout is a section, not a value: set its fields, "
        "algorithm.rollout.FIELD: VALUE (command line: algorithm.rollout.FIELD=VALUE); its fields are engine, "
        "vllm_gpu_memory_utilization, vllm_sleep, vllm_server_url, vllm_server_timeout, batch_size, epochs, "
        "max_new_tokens, temperature, top_p, stop, generation_batch_size, merge_adapters, dtype, overlong, "
        "overlong_reward, overlong_cache, tis_cap",
    ]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=grpo"])
    assert str(err.value).splitlines()[1:] == [
        "  algorithm: algorithm is a section, not a value: did you mean "
        "algorithm.name: grpo (command line: algorithm.name=grpo)?"
    ]  # fmt: skip
    with pytest.raises(ConfigError) as err:  # a value the shell would split is quoted
        load_config(None, ["algorithm.name=grpo", "algorithm.rewards={name: task}"])
    assert str(err.value).splitlines()[1:] == [
        "  algorithm.rewards: must be a list: "
        "'algorithm.rewards=[{name: task}]' (YAML: rewards: [{name: task}])"
    ]  # fmt: skip
    # each fix as written is taken
    load_config(None, ["model.name=tiny", "algorithm.name=grpo", "algorithm.rewards=[{name: task}]"])


def test_betas_and_stop_strings_that_cannot_run_are_refused_with_the_config():
    """AdamW refused a beta outside [0, 1) only after the model loaded and the run folder held a config.yaml (which
    then refused the corrected rerun); YAML's booleans read as 1.0 and 0.0; an empty stop string ended every
    completion at its first token (an audit, twenty-third session)."""
    for override, says in (("optim.betas=[0.9,1.5]", "optim.betas: each must be in [0, 1)"),
                           ("optim.betas=[-0.1,0.9]", "optim.betas: each must be in [0, 1)"),
                           ("optim.betas=[true,false]", "optim.betas: must be two numbers in [0, 1)")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [override])
    assert load_config(None, ["optim.betas=[0, 0.99]"]).optim.betas == (0.0, 0.99)
    with pytest.raises(ConfigError, match="algorithm.rollout.stop: an empty stop string would end every completion"):
        load_config(None, ["algorithm.name=grpo", "algorithm.rewards=[numeric_answer]", "algorithm.rollout.stop=['']"])


def test_single_quoted_newlines_in_stop_strings_and_turn_markers_are_refused(tmp_path):
    """YAML's single quotes keep \\n as a backslash and an n: a stop string that never fired and a marker no text
    held (a user-journey audit, twenty-third session)."""
    f = tmp_path / "run.yaml"
    f.write_text("algorithm:\n  name: grpo\n  rewards: [numeric_answer]\n  rollout: {stop: ['\\n\\n']}\n")
    literal = "\\n\\n"  # a backslash, an n, a backslash, an n
    with pytest.raises(ConfigError, match=re.escape(f"algorithm.rollout.stop (line 4): {literal!r} holds a backslash")):
        load_config(f)
    f.write_text("algorithm:\n  name: dpo\ndata:\n  turns: {user: '\\n\\nHuman:', assistant: \"\\n\\nAssistant:\"}\n")
    with pytest.raises(ConfigError, match="the marker of user, '.*', holds a backslash and a letter"):
        load_config(f)
    f.write_text("algorithm:\n  name: grpo\n  rewards: [numeric_answer]\n  rollout: {stop: [\"\\n\\n\"]}\n")
    assert load_config(f).algorithm.rollout.stop == ["\n\n"]


def test_a_resume_naming_the_same_file_in_another_spelling_is_no_change(tmp_path, monkeypatch):
    from posttrain.algorithms import load_config
    from posttrain.train import _config_changes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "x.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    before = load_config(None, ["data.train=work/x.jsonl"]).model_dump(mode="json")
    assert _config_changes(before, load_config(None, ["data.train=./work/x.jsonl"])) == []
    (tmp_path / "work" / "y.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    assert _config_changes(before, load_config(None, ["data.train=work/y.jsonl"])) == [
        "data.train: work/x.jsonl -> work/y.jsonl"]  # fmt: skip


def test_latex_stop_strings_are_not_taken_for_single_quoted_newlines():
    """The single-quote check refused LaTeX's \\nabla, \\text{...} and \\tag (a review): a backslash-n or -t followed
    by a lowercase letter is LaTeX's, kept; followed by another backslash, a capital, a digit or nothing it is
    refused."""
    rl = ["algorithm.name=grpo", "algorithm.rewards=[numeric_answer]"]
    for stop in ("\\\\nabla", "\\\\text{Answer}", "\\\\tag"):
        assert load_config(None, [*rl, f'algorithm.rollout.stop=["{stop}"]']).algorithm.rollout.stop == [stop.replace("\\\\", "\\")]
    for stop in ("\\\\n\\\\n", "\\\\nQuestion:", "\\\\n"):
        with pytest.raises(ConfigError, match="holds a backslash and a letter"):
            load_config(None, [*rl, f'algorithm.rollout.stop=["{stop}"]'])


def test_a_run_recorded_by_the_first_weights_fingerprint_resumes():
    """The first version recorded a hub model's revision and a run folder's top folder (the sha256 of no file): a
    resume after the upgrade was refused as changed weights (a review)."""
    import hashlib

    from posttrain.trainer.fingerprint import check_same_weights

    now = {"model.name": {"path": "org/m", "sha256": "abc"}, "algorithm.reward_model": {"path": "runs/rm", "sha256": "d"}}
    old = {"model.name": {"path": "org/m", "sha256": "revision 1234"},
           "algorithm.reward_model": {"path": "runs/rm", "sha256": hashlib.sha256().hexdigest()}}  # fmt: skip
    check_same_weights(Path("run"), old, now)  # not refused
    with pytest.raises(ConfigError, match=r"the weights of model.name \(org/m\) changed"):
        check_same_weights(Path("run"), {"model.name": {"path": "org/m", "sha256": "abd"}}, now)


def test_overrides_given_as_one_string_are_refused_with_the_list_they_should_be():
    """`load_config(path, "run.max_steps=20")` was read a character at a time: "override 'r' is not of the form"."""
    with pytest.raises(ConfigError, match=r"not one string: load_config\(path, \['run.max_steps=20'\]\)"):
        load_config(None, "run.max_steps=20")


def test_an_unknown_key_made_by_an_override_is_blamed_on_the_override_not_the_file(tmp_path):
    """`optim.nope.x=1` made the unknown key optim.nope, and the error named the file's line of `optim:`."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"optim\.nope \(command line: optim\.nope\.x=1\): unknown key"):
        load_config(path, ["optim.nope.x=1"])
