"""Run by test_distributed.py under torch.distributed (2 CPU processes, gloo): train, then dump parameters."""

import sys

import torch

from posttrain.config import load_config
from posttrain.train import train

cfg = load_config(sys.argv[1])
result = train(cfg, return_model=True)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({n: p.detach().cpu() for n, p in result.model.named_parameters()}, f"{sys.argv[2]}/rank{rank}.pt")
