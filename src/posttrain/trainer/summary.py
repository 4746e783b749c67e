"""The end-of-run summary: what one `train` call did, as a JSON-ready dict and as the lines the CLI prints.

`run_summary(result)` reads only the `TrainResult` and the run folder (no model, no config): steps trained this
call, the last step's loss and the method's key metric (`Algorithm.key_metric`), the last evaluation, wall time,
peak memory, and where the run folder, `report.html` and the TensorBoard events are. `format_summary` turns it
into the human output of `posttrain train`; `posttrain train --json` prints the dict itself (docs/cli-json.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.train import TrainResult

GB = 1e9
"""Memory is reported in decimal gigabytes everywhere: the summary, `metrics.jsonl` (`peak_rss_gb`, the training
loop) and the report read one unit (the summary used GiB under the label GB, and read 0.29 where the metrics read
0.31 for the same memory: an audit)."""


def peak_memory_gb() -> tuple[float | None, float | None]:
    """(peak resident memory of this process, peak GPU memory allocated by torch) in GB (1e9 bytes); None where unknown
    (no `resource` module on Windows; no CUDA). Both are process-lifetime peaks, not just one run's."""
    rss = None
    try:
        import resource
    except ImportError:
        pass
    else:
        # ru_maxrss is in kibibytes on Linux and in bytes on macOS (getrusage(2) on each).
        scale = 1 if sys.platform == "darwin" else 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GB
    gpu = None
    torch = sys.modules.get("torch")  # a process that never imported torch used no GPU through it
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / GB
    return rss, gpu


def _last(history: list[dict], has) -> dict | None:
    return next((h for h in reversed(history) if has(h)), None)


def run_summary(result: TrainResult) -> dict:
    """What `result` says, with the run folder's paths (docs/cli-json.md, `train`, lists every key).

    Training records are those with a `loss`; evaluation records those with an `eval_loss`.
    """
    run_dir = Path(result.run_dir)
    last = _last(result.history, lambda h: "loss" in h)
    evaluation = _last(result.history, lambda h: "eval_loss" in h)
    key = result.key_metric
    report, tensorboard = run_dir / "report.html", run_dir / "tensorboard"
    n = result.steps_trained
    # GRPO and RLOO: a step whose every group scored alike (`uniform_group_fraction` 1.0, over every process's
    # groups) had no reward signal: advantage 0 everywhere, whatever beta and however many processes sampled
    signal = [h for h in result.history if "loss" in h and "uniform_group_fraction" in h]
    idle = sum(h["uniform_group_fraction"] >= 1.0 for h in signal)
    # A step with no loss unit trained nothing: RL under overlong: filter when every completion was cut.
    empty = [h for h in result.history if "loss" in h and h.get("loss_units") == 0]
    return {
        "run_dir": str(run_dir),
        "final_dir": str(result.final_dir),
        "method": result.method,
        "steps": result.steps,
        "steps_trained": n,
        "first_step": result.steps - n + 1 if n else None,
        "steps_without_signal": idle if signal else None,
        "steps_without_tokens": len(empty),
        "final_loss": last["loss"] if last else None,
        "key_metric": {"name": key, "value": last[key]} if last and key in last else None,
        "metrics": last,
        "eval": evaluation,
        "wall_time_s": result.wall_time_s,
        "peak_rss_gb": result.peak_rss_gb,
        "peak_gpu_gb": result.peak_gpu_gb,
        "metrics_file": str(run_dir / "metrics.jsonl"),
        "report": str(report) if report.is_file() else None,
        "tensorboard": str(tensorboard) if tensorboard.is_dir() else None,
    }


def _duration(seconds: float) -> str:
    """
    >>> _duration(12.34), _duration(754), _duration(7384)
    ('12.3 s', '12 min 34 s', '2 h 3 min')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min {int(seconds % 60)} s"
    return f"{minutes // 60} h {minutes % 60} min"


def format_summary(s: dict) -> str:
    """The end-of-run summary as `posttrain train` prints it: the `done:` line, then one line per item known.

    >>> print(format_summary({"run_dir": "runs/a", "final_dir": "runs/a/final", "steps": 4, "steps_trained": 2,
    ...     "first_step": 3, "final_loss": 0.5, "key_metric": {"name": "reward_accuracy", "value": 0.75},
    ...     "eval": {"step": 4, "eval_loss": 0.625, "eval_reward_accuracy": 0.5}, "wall_time_s": 61.0,
    ...     "peak_rss_gb": 1.5, "peak_gpu_gb": None, "report": None, "tensorboard": "runs/a/tensorboard"}))
    done: 2 steps (steps 3-4 of 4); last loss 0.5000; model in runs/a/final
      last step:    loss 0.5000, reward_accuracy 0.75
      evaluation:   step 4: eval_loss 0.6250, eval_reward_accuracy 0.5
      time:         1 min 1 s
      peak memory:  1.50 GB RAM
      run folder:   runs/a
      TensorBoard:  tensorboard --logdir runs/a/tensorboard
    """
    n, last = s["steps_trained"], s["steps"]
    span = ""
    if 0 < n < last:  # a resumed run: which steps this invocation trained
        span = f" (step {last} of {last})" if n == 1 else f" (steps {s['first_step']}-{last} of {last})"
    loss = f"; last loss {s['final_loss']:.4f}" if s["final_loss"] is not None else ""
    lines = [f"done: {n} step{'s' if n != 1 else ''}{span}{loss}; model in {s['final_dir']}"]

    def item(label: str, text: str) -> None:
        lines.append(f"  {label + ':':<13} {text}")

    key = s["key_metric"]
    if key is not None:  # the loss is on the done: line already
        item("last step", f"loss {s['final_loss']:.4f}" + (f", {key['name']} {key['value']:.4g}" if key else ""))
    if s.get("steps_without_tokens"):
        item("nothing trained", f"{s['steps_without_tokens']} of these {n} steps had no token in the loss "
                                "(loss_units 0), so no gradient (only AdamW's momentum and weight decay moved the "
                                "weights): every completion reached algorithm.rollout.max_new_tokens and "
                                "algorithm.rollout.overlong: filter leaves such completions out of the loss; raise "
                                "max_new_tokens, or use overlong: score (docs/rl.md)")  # fmt: skip
    if s.get("steps_without_signal"):
        item("no signal", f"{s['steps_without_signal']} of these {n} steps had none: every completion of every group "
                          "scored alike (uniform_group_fraction 1.0), so the rewards gave no gradient (only AdamW's "
                          "momentum and any KL penalty moved the weights); check that the rewards can tell "
                          "completions apart (docs/rl.md)")
    ev = s["eval"]
    if ev is not None:
        shown = [f"eval_loss {ev['eval_loss']:.4f}"]
        eval_key = f"eval_{key['name']}" if key else None
        if eval_key in ev:
            shown.append(f"{eval_key} {ev[eval_key]:.4g}")
        item("evaluation", f"step {ev['step']}: " + ", ".join(shown))
    if s.get("wall_time_s") is not None:
        item("time", _duration(s["wall_time_s"]))
    memory = [f"{s[k]:.2f} GB {what}" for k, what in (("peak_rss_gb", "RAM"), ("peak_gpu_gb", "GPU"))
              if s.get(k) is not None]  # fmt: skip
    if memory:
        item("peak memory", ", ".join(memory))
    item("run folder", s["run_dir"])
    if s.get("report"):
        item("report", s["report"])
    if s.get("tensorboard"):
        item("TensorBoard", f"tensorboard --logdir {s['tensorboard']}")
    return "\n".join(lines)
