"""Run by test_distributed.py under torch.distributed (2 CPU processes, gloo): train, then dump parameters."""

import sys


def main(config_path: str, out_dir: str) -> None:
    import torch

    from posttrain.algorithms import load_config
    from posttrain.train import train

    result = train(load_config(config_path), return_model=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.save({n: p.detach().cpu() for n, p in result.model.named_parameters()}, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
