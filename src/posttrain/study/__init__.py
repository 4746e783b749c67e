"""`posttrain study`: a reproducible experiment on when SFT's input-output pairs are not enough.

From one short SFT warm start W, arms trained for the same wall-clock seconds (more SFT on the same fixed-template
pairs, SFT on reworded prompts, GRPO with the verifier, DPO on on-policy pairs, and in the full setting SFT on W's
own verified samples and GRPO with a random reward) are scored on the same problems in distribution and on
out-of-distribution splits (unseen paraphrases, an irrelevant sentence with a number, unseen names and items,
unseen phrasings of the rarer operation), with pass@k and the drift from the base; intervals from a hierarchical
bootstrap over seeds and problems; the pre-registered predictions checked against the numbers.

Modules: `config` (the settings, read from configs/study/*.yaml), `data` (the splits), `arms` (what each arm trains
and how budgets become steps), `scoring` (one model on one seed's rows), `summary` (the statistics), `core`
(`run_study`, resumable), `render` (terminal and report). See docs/study.md.
"""

from posttrain.study.config import StudyConfig, load_study_config
from posttrain.study.core import run_study
from posttrain.study.render import format_study, write_study_report
from posttrain.study.summary import StudyResult

__all__ = ["StudyConfig", "StudyResult", "format_study", "load_study_config", "run_study", "write_study_report"]
