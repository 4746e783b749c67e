"""Run by test_distributed.py under torch.distributed and by test_accelerate_launch.py under `accelerate launch` (2 CPU
processes, gloo): train, then dump parameters (`rank{R}.pt`) and the world this process ran in (`rank{R}.json`)."""

import json
import sys


def main(config_path: str, out_dir: str) -> None:
    import torch

    from posttrain.algorithms import load_config
    from posttrain.train import train

    result = train(load_config(config_path), return_model=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({n: p.detach().cpu() for n, p in result.model.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world_size": world, "backend": backend}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
