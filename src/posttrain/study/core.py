"""`run_study`: the whole experiment, resumable, from a setting to a typed `StudyResult`.

For each seed and noise level (a *condition*, folder `OUT/seed-S/noise-P/`): the data (`data/`, `study.data`),
the warm start W (`warm/`, a LoRA SFT run, merged into its base in `warm-merged/`), W's scores, then each arm
(`arms/ARM/`: its prepared data, `plan.json` with its measured seconds per step and steps, its run folder `run/`,
the scores of each of its checkpoints, `result.json` once it is done). Everything is written as it is made, and
each part is reused when it is there: a study stopped at any point continues where it stopped (a run folder
resumes from its last checkpoint; a finished arm is read back, not retrained). The settings are kept in
`OUT/study.yaml`; running other settings into the same folder is refused.

The statistics are `study.summary`'s; the report `study.render`'s.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from posttrain.data import write_jsonl
from posttrain.diagnose.drift import PROBE_TOKENS, PROBES
from posttrain.errors import ConfigError
from posttrain.evaluation import load_for_inference
from posttrain.files import write_whole
from posttrain.models import generate, merge_adapter, read_info, resolve_model
from posttrain.study.arms import ARMS, Arm, Condition, Prepared, run_config, steps_for_budget
from posttrain.study.config import StudyConfig
from posttrain.study.data import make_seed_data
from posttrain.study.scoring import Scores, load_checkpoint_model, score_model
from posttrain.study.summary import Cell, Point, StudyResult, stated, summarise
from posttrain.train import train
from posttrain.trainer.checkpoint import checkpoint_dir, latest_checkpoint

WARM = "warm-start"
_CONTINUE = "the same `posttrain study` command"  # how an interrupted study goes on (`train`'s Ctrl-C note)


def run_study(cfg: StudyConfig, out: str | Path, *, setting: str = "custom", progress: bool = True) -> StudyResult:
    """Run (or continue) the study `cfg` in folder `out` and return what it measured (module docstring)."""
    started = time.perf_counter()
    out = Path(out)
    for kind in sorted({"warm", *(ARMS[a].run for a in cfg.arms)}):  # every run config checked before anything
        run_config(cfg, kind, model=cfg.model, train_file="x.jsonl", out=out / "x", seed=0, steps=3,
                   rewards=[{"name": "task"}] if kind == "grpo" else None)  # fmt: skip
    resolve_model(cfg.model)  # a missing model is a UserError now, not after the study folder is written
    _hold_settings(cfg, out)
    _hold_predictions(cfg, out)
    base = _Lazy(lambda: load_for_inference(cfg.model))
    drift = cfg.evaluation.drift
    probe = _probe_texts(out, base) if drift else []
    cells: list[Cell] = []
    rows: dict[int, list[dict]] = {}
    for seed in cfg.seeds:
        for noise in cfg.noise:
            folder = out / f"seed-{seed}" / f"noise-{round(100 * noise)}"
            _stage(f"seed {seed}, {100 * noise:.0f}% wrong demonstrations: {folder}")
            data = make_seed_data(cfg.task, seed, noise)
            rows[seed] = data.eval  # the same whatever the noise
            files = {name: write_jsonl(made, folder / "data" / f"{name}.jsonl")
                     for name, made in (("train", data.train), ("varied", data.varied), ("prompts", data.prompts),
                                        ("eval", data.eval))}  # fmt: skip
            ctx = _Context(cfg, folder, data.eval, base if drift else None, probe, progress, seed)
            warm_dir = _warm_start(ctx, files)
            warm = _Lazy(lambda d=warm_dir: load_for_inference(str(d)))
            ctx.tokenizer = warm.get()[1]
            cond = Condition(seed, noise, folder, files, warm_dir, warm.get)
            cells.append(_warm_cell(ctx, warm, noise))
            if cfg.evaluation.base and noise == cfg.noise[0]:
                cells.append(_base_cell(ctx, base, noise))
            for name in cfg.arms:
                cells.append(_run_arm(ARMS[name], ctx, cond))
            warm.clear()
    return summarise(cfg, setting, cells, rows, out=str(out), seconds=time.perf_counter() - started)


@dataclass
class _Lazy:
    """A value made on first use (a model: loaded only if something needs it)."""

    make: Callable
    value: object = None

    def get(self):
        if self.value is None:
            self.value = self.make()
        return self.value

    def clear(self) -> None:
        self.value = None


@dataclass
class _Context:
    cfg: StudyConfig
    folder: Path
    rows: list[dict]
    base: _Lazy | None
    probe: list[str]
    progress: bool
    seed: int
    tokenizer: object = None
    sample_rows: list[dict] = field(init=False)
    curve_rows: list[dict] = field(init=False)

    def __post_init__(self) -> None:
        ev = self.cfg.evaluation
        clean = [r for r in self.rows if r["split"] == "id"]
        self.sample_rows = clean[: ev.pass_problems]
        first = {r["id"] for r in clean[: ev.curve_problems]}
        self.curve_rows = [r for r in self.rows if r["id"] in first or r.get("perturbs") in first]

    def score(self, model, *, full: bool) -> Scores:
        """Every row, the samples and the drift (`full`), or the curve rows only."""
        base = self.base.get()[0] if full and self.base is not None else None
        return score_model(model, self.tokenizer, self.rows if full else self.curve_rows, self.cfg.evaluation,
                           seed=self.seed, sample_rows=self.sample_rows if full else (), base=base,
                           probe_texts=self.probe, progress=self.progress)  # fmt: skip


def _stage(msg: str) -> None:
    print(f"\n==> {msg}", file=sys.stderr, flush=True)


def _hold_settings(cfg: StudyConfig, out: Path) -> None:
    """Write `out/study.yaml`, or check that the study already there has the same settings."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; give a folder for the study")
    saved = out / "study.yaml"
    now = cfg.model_dump(mode="json")
    if saved.exists():
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        changed = _changes(before, now)
        if changed:
            raise ConfigError(f"{out} holds a study with other settings ({'; '.join(changed[:5])}); run the same "
                              "settings to continue it, or give another --out to start a new one")  # fmt: skip
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no study (no study.yaml); give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(now, sort_keys=False), encoding="utf-8")


def _hold_predictions(cfg: StudyConfig, out: Path) -> None:
    """Write `out/predictions.json` (`summary.stated`: the predictions and the statistics their verdicts use, with
    the time they were stated) before anything trains, or check that those already stated are the ones this run
    would judge by: a study continued or summarised again after its predictions or thresholds changed (posttrain's
    code, or a hand-edited study.yaml) is refused, not judged against what was chosen after its results."""
    path = out / "predictions.json"
    now = stated(cfg)
    if path.exists():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} cannot be read ({err}): it holds what this study stated before its results; "
                              "restore it, or start the study in another --out") from None  # fmt: skip
        changed = _changes({k: before.get(k) for k in now}, now)
        if changed:
            raise ConfigError(f"{path} holds the predictions and statistics this study stated before its results "
                              f"(at {before.get('stated_at', 'an unknown time')}), and this run would judge by others "
                              f"({'; '.join(c[:200] for c in changed[:3])}). Verdicts are judged by what was stated in "
                              "advance: run the study in a new --out to state new ones") from None  # fmt: skip
        return
    write_whole(path, json.dumps({"stated_at": datetime.now(UTC).isoformat(timespec="seconds"), **now}, indent=2))


def _changes(before, now, prefix: str = "") -> list[str]:
    """``field: old -> new`` for each setting that differs.

    >>> _changes({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c: 2 -> 3']
    """
    if isinstance(before, dict) and isinstance(now, dict):
        return [c for k in sorted(set(before) | set(now)) for c in _changes(before.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if before == now else [f"{prefix.rstrip('.')}: {before} -> {now}"]


def _probe_texts(out: Path, base: _Lazy) -> list[str]:
    """The base's greedy continuations of the unrelated `PROBES` (cached): what drift's probe scores."""
    cache = out / "probe.json"
    if cache.exists():  # (the study's folder holds one setting's runs: `study_settings` refuses another's)
        try:
            texts = json.loads(cache.read_text(encoding="utf-8"))
            if isinstance(texts, list) and len(texts) == len(PROBES):
                return texts
        except (json.JSONDecodeError, UnicodeDecodeError):  # written before it was written whole: made again
            pass
    model, tokenizer = base.get()
    texts = generate(model, tokenizer, list(PROBES), max_new_tokens=PROBE_TOKENS, temperature=0.0)
    write_whole(cache, json.dumps(texts))
    return texts


def _finished(run_dir: Path, steps: int) -> bool:
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and int(ckpt.name.split("-")[1]) >= steps and (run_dir / "final").is_dir()


def _warm_start(ctx: _Context, files: dict[str, Path]) -> Path:
    """W: SFT on the fixed-template pairs (resumed if interrupted), merged into its base; returns its folder."""
    cfg, run_dir = ctx.cfg, ctx.folder / "warm"
    rc = run_config(cfg, "warm", model=cfg.model, train_file=files["train"], out=run_dir, seed=ctx.seed,
                    steps=cfg.warm_start.steps, progress=ctx.progress)  # fmt: skip
    if not _finished(run_dir, cfg.warm_start.steps):
        _stage(f"warm start W: SFT for {cfg.warm_start.steps} steps")
        train(rc, resume=True, continue_with=_CONTINUE)
    if read_info(run_dir / "final").get("kind") != "adapter":
        return run_dir / "final"
    merged = ctx.folder / "warm-merged"
    if not (merged / "posttrain_model.json").is_file():
        merge_adapter(run_dir, merged)
    return merged


def _cached_scores(path: Path, make: Callable[[], Scores]) -> Scores:
    if path.exists():
        return Scores.from_dict(json.loads(path.read_text(encoding="utf-8")))
    scores = make()
    _write_json(path, scores.to_dict())
    return scores


def _write_json(path: Path, data) -> None:
    write_whole(path, json.dumps(data))  # whole or absent: a kill never leaves half a file to reuse


def _warm_cell(ctx: _Context, warm: _Lazy, noise: float) -> Cell:
    path = ctx.folder / "warm-scores.json"
    reused = path.exists()
    if not reused:
        _stage("scoring W")
    scores = _cached_scores(path, lambda: ctx.score(warm.get()[0], full=True))
    return Cell(WARM, ctx.seed, noise, "reused" if reused else "trained", steps=ctx.cfg.warm_start.steps,
                points=[Point(0, 0.0, 0.0, scores, True)])  # fmt: skip


def _base_cell(ctx: _Context, base: _Lazy, noise: float) -> Cell:
    path = ctx.folder / "base-scores.json"
    scores = _cached_scores(path, lambda: ctx.score(base.get()[0], full=True))
    return Cell("base", ctx.seed, noise, "reused", points=[Point(0, 0.0, 0.0, scores, True)])


def _run_arm(arm: Arm, ctx: _Context, cond: Condition) -> Cell:
    """One arm in one condition: prepare, calibrate, train to its budget, score its checkpoints (module docstring
    of `study.arms`); a finished arm is read back."""
    cfg, b = ctx.cfg, ctx.cfg.budget
    arm_dir = cond.folder / "arms" / arm.name
    done = arm_dir / "result.json"
    if done.exists():
        return _read_cell(done, arm_dir)
    arm_dir.mkdir(parents=True, exist_ok=True)
    _stage(f"arm {arm.name}: {arm.label}")
    prep_file = arm_dir / "prepared.json"
    if prep_file.exists():
        prepared = Prepared(**json.loads(prep_file.read_text(encoding="utf-8")))
    else:
        prepared = arm.prepare(cond, cfg, arm_dir, ctx.progress)
        _write_json(prep_file, asdict(prepared))
    keep = b.calibration_steps + b.checkpoints  # every calibration step and every scored checkpoint stays

    def config(steps: int, every: int):
        return run_config(cfg, arm.run, model=cond.warm_dir, train_file=prepared.file, out=arm_dir / "run",
                          seed=cond.seed, steps=steps, save_every=every, keep=keep,
                          rewards=arm.rewards(cond.seed) if arm.rewards else None, progress=ctx.progress)  # fmt: skip

    cell = Cell(arm.name, cond.seed, cond.noise, "trained", budget_s=b.seconds, prepared_s=prepared.seconds)
    batch = config(b.calibration_steps, 1).optim.batch_size
    if prepared.rows < batch:
        cell.status = "not run"
        cell.note = (f"{arm.name}, seed {cond.seed}: only {prepared.rows} training rows (fewer than a batch of "
                     f"{batch}): {prepared.stats}")  # fmt: skip
        _write_json(done, cell.record())
        return cell
    plan_file = arm_dir / "plan.json"
    if not plan_file.exists():
        train(config(b.calibration_steps, 1), resume=True, continue_with=_CONTINUE)
        step_s = statistics.fmean(r["step_time_s"] for r in _step_records(arm_dir / "run")[: b.calibration_steps])
        steps = steps_for_budget(b.seconds - prepared.seconds, step_s, b.checkpoints, b.calibration_steps)
        _write_json(plan_file, {"step_s": step_s, "steps": steps, "seconds_left": b.seconds - prepared.seconds})
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    cell.step_s, cell.steps = plan["step_s"], plan["steps"]
    if not _finished(arm_dir / "run", cell.steps):
        train(config(cell.steps, cell.steps // b.checkpoints), resume=True, continue_with=_CONTINUE)
    records = _step_records(arm_dir / "run")
    technique = config(cell.steps, 1).technique
    for j in range(1, b.checkpoints + 1):
        step, full = j * cell.steps // b.checkpoints, j == b.checkpoints
        ckpt = checkpoint_dir(arm_dir / "run") / f"step-{step:06d}"
        scores = _cached_scores(arm_dir / f"scores-step-{step:06d}.json",
                                lambda c=ckpt, f=full: ctx.score(load_checkpoint_model(cond.warm_dir, technique, c),
                                                                 full=f))  # fmt: skip
        cell.points.append(Point(step, prepared.seconds + sum(r["step_time_s"] for r in records[:step]),
                                 sum(r["tokens"] for r in records[:step]), scores, full))  # fmt: skip
    cell.seconds, cell.tokens = cell.points[-1].seconds, cell.points[-1].tokens
    _write_json(done, cell.record())
    return cell


def _step_records(run_dir: Path) -> list[dict]:
    """The training steps' records of a run's metrics.jsonl, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted((r for r in map(json.loads, lines) if "step_time_s" in r), key=lambda r: r["step"])


def _read_cell(done: Path, arm_dir: Path) -> Cell:
    """A finished arm, from its result.json and the scores of its checkpoints."""
    cell = Cell.from_record(json.loads(done.read_text(encoding="utf-8")))
    cell.status = "reused" if cell.status == "trained" else cell.status
    for p in cell.points:
        p.scores = Scores.from_dict(json.loads((arm_dir / f"scores-step-{p.step:06d}.json").read_text("utf-8")))
    return cell
