"""Rollouts for RL: sampling engines (`engine`) and the rollout batch source that feeds the training loop
(`source`). Nothing heavy is imported here; see docs/rl.md."""

from posttrain.rollout.engine import HFEngine, Rollout
from posttrain.rollout.engines import ENGINES, get_engine

__all__ = ["ENGINES", "HFEngine", "Rollout", "get_engine"]
