"""Read what a run folder holds, for a report: any subset of it, never more than the files say.

`metrics.jsonl` is required (with at least one record); everything else is optional: `config.yaml` (shown as
YAML; only `algorithm.name`, `technique.name` and `model.name` are read from it, and only if present),
`results.json` and `eval_base.json` (written by `posttrain quickstart`), `samples.jsonl` (RL runs,
`rollout.samples`). Lines a reader cannot use (cut by a kill mid-write, or not a JSON object) are skipped and
counted in the report's notes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError


@dataclass
class Run:
    path: Path
    label: str  # the name a report gives the run (its folder name; more of its path where two names clash)
    records: list[dict]  # every metrics record, in file order (training steps and evaluations)
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    results: dict | None = None  # results.json: {"before", "after", "changes"?, ...}
    base_scores: dict | None = None  # eval_base.json: the base model's held-out scores
    samples: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(setting(self.config, "algorithm.name") or "unknown")

    @property
    def steps(self) -> list[dict]:
        """The training records (those with a `loss`), not the evaluation ones."""
        return [r for r in self.records if "loss" in r]

    def keys(self) -> set[str]:
        """Every metric key with at least one finite number."""
        return {k for r in self.records for k, v in r.items() if _finite(v)}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key` over the records that hold a finite number for it."""
        pairs = [(r["step"], r[key]) for r in self.records if _finite(r.get(key)) and _finite(r.get("step"))]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def setting(config: dict, dotted: str):
    """A config value by dotted name, or None where the config does not have it.

    >>> setting({"algorithm": {"name": "dpo"}}, "algorithm.name"), setting({}, "model.name")
    ('dpo', None)
    """
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file and how many non-empty lines were not one."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        notes.append(f"{path.name} could not be read ({err}); it is left out")
        return None
    return data if isinstance(data, dict) else None


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder's files (module docstring); a UserError when it is not a run folder or has no metrics."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder; give a run folder (the run.output_dir of a `posttrain train`)")
    metrics = path / "metrics.jsonl"
    if not path.is_dir() or not (metrics.is_file() or (path / "config.yaml").is_file()):
        raise UserError(
            f"{path} is not a run folder: it has no metrics.jsonl or config.yaml. Give the folder a "
            "`posttrain train` wrote (its run.output_dir, e.g. runs/quickstart)."
        )
    notes: list[str] = []
    records, bad = read_jsonl(metrics) if metrics.is_file() else ([], 0)
    read = len(records)
    records = [r for r in records if _finite(r.get("step"))]
    if not any("loss" in r for r in records):
        unreadable = bad + read - len(records)
        if unreadable and not records:  # lines there, none usable: a damaged file, not a run that has yet to log
            raise UserError(
                f"{metrics}: none of its records can be read ({unreadable} line(s) are not JSON records with a step, e.g. "
                "a file that is not UTF-8 or was overwritten); restore it from the run, or train it again"
            )
        raise UserError(
            f"{metrics} has no training records yet{'' if metrics.is_file() else ' (the file is missing)'}: the "
            "run has not logged a step. Wait for its first logged step (run.log_every), or train it: "
            f"posttrain train {path / 'config.yaml'} --resume"
        )
    if bad:
        notes.append(f"metrics.jsonl: {bad} line(s) were not JSON records (e.g. cut by a kill) and are skipped")
    run = Run(path=path, label=label or path.resolve().name, records=records, notes=notes)
    config = path / "config.yaml"
    if config.is_file():
        run.config_text = config.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as err:
            notes.append(f"config.yaml is not valid YAML ({str(err).splitlines()[0]}); shown as it is")
    else:
        notes.append("no config.yaml in the run folder: the method and settings are unknown")
    run.results = _read_json(path / "results.json", notes)
    base = _read_json(path / "eval_base.json", notes)
    # {"scores", "made_from"} since the quickstart keys its cache (`evaluation.cache`); the recipes' are flat
    if base is not None and "made_from" in base:
        base = base["scores"] if isinstance(base.get("scores"), dict) else None
    run.base_scores = base
    if (path / "samples.jsonl").is_file():
        run.samples, bad = read_jsonl(path / "samples.jsonl")
        if bad:
            notes.append(f"samples.jsonl: {bad} line(s) were not JSON records and are skipped")
    return run


def labels(paths: list[Path]) -> list[str]:
    """Each run's name in a report: its folder name, or more of its path where two would be the same.

    >>> labels([Path("a/run"), Path("b/run"), Path("c/x")])
    ['a/run', 'b/run', 'x']
    """
    parts = [p.resolve().parts for p in paths]
    out = []
    for i, p in enumerate(parts):
        depth = 1
        while depth < len(p) and any(q[-depth:] == p[-depth:] for j, q in enumerate(parts) if j != i):
            depth += 1
        out.append("/".join(p[-depth:]))
    return out


def read_runs(paths: list[str | Path]) -> list[Run]:
    paths = [Path(p) for p in paths]
    if len({p.resolve() for p in paths}) < len(paths):
        raise UserError("the same run folder is given twice; give each run once")
    return [read_run(p, name) for p, name in zip(paths, labels(paths))]
