"""Run by test_sharding.py under torchrun (2 CPU processes, gloo): train each config given in turn, then save what
this process held (parameter elements: of the whole model, and of a scalar head) and the whole trained weights.
`PATH@resume` continues PATH's run folder from its latest checkpoint."""

import sys


def main(out_dir: str, *config_paths: str) -> None:
    from pathlib import Path

    import torch

    from posttrain.algorithms import load_config
    from posttrain.models.heads import ScalarHeadModel
    from posttrain.models.sharding import full_state, is_sharded, parameter_elements
    from posttrain.train import train

    for arg in config_paths:
        path, _, mode = arg.partition("@")
        result = train(load_config(path), return_model=True, resume=mode == "resume")
        model = result.model
        rank = torch.distributed.get_rank()
        local, total = parameter_elements(model)
        if is_sharded(model):
            weights = full_state(model)  # every process calls it; the main process gets the tensors
        else:
            weights = {n: p.detach().cpu() for n, p in model.named_parameters()}
        head = parameter_elements(model.head) if isinstance(model, ScalarHeadModel) else None
        torch.save({"local": local, "total": total, "sharded": is_sharded(model), "head": head, "weights": weights},
                   f"{out_dir}/{Path(path).stem}{'-' + mode if mode else ''}-rank{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
