"""posttrain: post-training for language models (SFT, DPO, PPO, GRPO) with advice and cost estimates.

`import posttrain` stays light: torch, transformers and the like load only when a function that needs them runs.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy exports: `posttrain.estimate(...)` and `posttrain.advise(...)` without importing them at start-up.
    if name == "estimate":
        from posttrain.estimator import estimate

        return estimate
    if name == "advise":
        from posttrain.advisor import advise

        return advise
    if name == "train":
        from posttrain.train import train

        return train
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
