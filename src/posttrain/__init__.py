"""posttrain: post-training for language models (SFT, DPO, PPO, GRPO) with advice and cost estimates.

`import posttrain` stays light: torch, transformers and the like load only when a function that needs them runs.
"""

__version__ = "0.1.0"
