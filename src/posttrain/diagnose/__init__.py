"""`posttrain diagnose`: measure where a model and its data stand, then say whether to keep SFT (with more diverse
or cleaner data), move to DPO on on-policy pairs, or to GRPO, naming the numbers behind the advice.

Probes, each a module with its pure functions (worked examples in their doctests) and one measuring function:

- `robustness`: greedy accuracy on clean prompts vs answer-preserving variants of the same prompts, each kind
  apart, paired (`stats.paired_gap`: exact McNemar and Newcombe's interval of the paired difference);
- `headroom`: pass@1 vs pass@k from n samples per prompt (`stats.pass_at_k`, Chen et al. 2021) and the share of
  prompts with mixed outcomes;
- `ambiguity`: near-duplicate SFT prompts with different responses, wrong demonstrations, length spread;
- preference signal: `evaluation.preference.preference_accuracy` on given pairs;
- `drift`: KL from a base model on the task, top-1 agreement with it on unrelated prompts.

`verifiers` says what counts as right (a task, reward functions, or a reward model: always named by the user);
`recommend` turns the measurements into advice with rules kept as data (`rules.yaml`); `core.run_diagnosis` runs
it all and returns a `Diagnosis`; `render` prints it and writes its report. See docs/diagnose.md.
"""

from posttrain.diagnose.core import AnswerFn, Diagnosis, Settings, model_answers, run_diagnosis
from posttrain.diagnose.recommend import Recommendation, recommend
from posttrain.diagnose.render import format_diagnosis, write_diagnosis_report
from posttrain.diagnose.robustness import load_perturbed
from posttrain.diagnose.verifiers import Verifier, judge_verifier, reward_verifier, task_verifier

__all__ = [
    "AnswerFn",
    "Diagnosis",
    "Recommendation",
    "Settings",
    "Verifier",
    "format_diagnosis",
    "judge_verifier",
    "load_perturbed",
    "model_answers",
    "recommend",
    "reward_verifier",
    "run_diagnosis",
    "task_verifier",
    "write_diagnosis_report",
]
