"""The GPU table: memory, dense bf16 throughput, memory bandwidth and an hourly price per GPU.

Memory and throughput are the vendors' datasheet numbers (dense, i.e. without 2:4 sparsity; for GPUs without
bf16 the fp16 tensor-core number). Prices are indicative on-demand cloud prices per GPU-hour in USD (mid-2025,
from public price lists; they vary by provider, region and commitment by 2x or more): override them with a
YAML or JSON file (`load_gpu_table`) of the same keys.

"Fits" means the estimated peak (decimal GB, 1e9 bytes) is at most `USABLE_FRACTION` (90%) of the GPU's listed
memory. The estimate counts the tensors a step keeps alive; a real process needs more, and the 10% kept free is
for what it leaves out:
  - the CUDA context and the libraries' handles and workspaces (cuBLAS, cuDNN, NCCL's communication buffers on
    several GPUs): from a few hundred MB to over 1 GB per process, before any tensor;
  - the caching allocator's fragmentation: PyTorch reserves memory in segments and cannot always reuse a freed
    block for a tensor of another size, so reserved memory runs above the live tensors, more so when batch
    shapes vary (see docs/estimator.md, "Calibration", for what our CPU runs kept beyond the estimate);
  - kernels' temporary buffers, and the reference or reward model's transient logits;
  - ECC: a T4, A10 or L4 shows less than its marketed size (a "24 GB" A10 exposes about 22.5 GiB).
vLLM's default `gpu_memory_utilization=0.9` leaves the same 10% for the same reasons. On the GPUs whose listed
"GB" are really GiB (A100, H100: 80 GiB = 85.9 GB) the margin is larger than 10%; we keep one rule for all.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from posttrain.errors import UserError
from posttrain.yamlfile import load_yaml, yaml_problem

USABLE_FRACTION = (
    0.90  # of a GPU's listed memory an estimate may fill (module docstring: what the rest is for)
)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak, TFLOP/s
    bandwidth_gbs: float  # HBM/GDDR bandwidth, GB/s (bounds generation speed)
    usd_per_hour: float

    @property
    def usable_gb(self) -> float:
        """Memory an estimate may fill and still fit: `USABLE_FRACTION` of the listed memory.

        >>> GPU("x", 24, 1, 1, 1).usable_gb
        21.6
        """
        return round(self.memory_gb * USABLE_FRACTION, 9)


# Datasheet numbers: NVIDIA T4, RTX 3090/4090, A10, L4, L40S, RTX A6000, A100, H100 SXM, H200, B200 and
# AMD MI300X product pages. T4 has no bf16: its fp16 tensor-core peak is listed.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in [
        GPU("T4-16GB", 16, 65, 320, 0.35),
        GPU("RTX3090-24GB", 24, 71, 936, 0.22),
        GPU("RTX4090-24GB", 24, 165, 1008, 0.40),
        GPU("A10-24GB", 24, 125, 600, 0.75),
        GPU("L4-24GB", 24, 121, 300, 0.80),
        GPU("A100-40GB", 40, 312, 1555, 1.30),
        GPU("RTXA6000-48GB", 48, 155, 768, 0.80),
        GPU("L40S-48GB", 48, 362, 864, 1.00),
        GPU("A100-80GB", 80, 312, 2039, 1.80),
        GPU("H100-80GB", 80, 989, 3350, 2.50),
        GPU("H200-141GB", 141, 989, 4800, 3.50),
        GPU("B200-180GB", 180, 2250, 8000, 5.50),
        GPU("MI300X-192GB", 192, 1307, 5300, 3.00),
    ]
}


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def find_gpu(name: str, table: dict[str, GPU] | None = None) -> GPU:
    """Look a GPU up by name, forgiving case and dashes (`h100`, `H100-80GB`, `a100_80gb`).

    A bare family name (`a100`) picks that family's largest-memory entry.
    """
    table = GPUS if table is None else table
    key = _norm(name)
    exact = [g for n, g in table.items() if _norm(n) == key]
    if exact:
        return exact[0]
    family = [g for n, g in table.items() if _norm(n).startswith(key) and key]
    if family:
        return max(family, key=lambda g: g.memory_gb)
    close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown GPU {name!r}.{hint} Known: {', '.join(table)}. Add your own with a GPU table file "
        "(--gpu-table FILE, keys memory_gb, bf16_tflops, bandwidth_gbs, usd_per_hour)."
    )


def custom_gpu(memory_gb: float, table: dict[str, GPU] | None = None) -> GPU:
    """A GPU known only by its memory: throughput and price borrowed from the cheapest table GPU at least as big."""
    if memory_gb <= 0:
        raise UserError(f"gpu_memory_gb ({memory_gb}) must be positive")
    table = GPUS if table is None else table
    bigger = [g for g in table.values() if g.memory_gb >= memory_gb] or list(table.values())
    like = min(bigger, key=lambda g: (g.memory_gb, g.usd_per_hour))
    return GPU(f"custom-{memory_gb:g}GB", memory_gb, like.bf16_tflops, like.bandwidth_gbs, like.usd_per_hour)


def load_gpu_table(path: str | Path | None) -> dict[str, GPU]:
    """The built-in table updated with a user file: a mapping name -> {memory_gb, bf16_tflops, ...}.

    An entry with a built-in name replaces only the keys it gives (e.g. just `usd_per_hour`).
    """
    table = dict(GPUS)
    if path is None:
        return table
    p = Path(path)
    lines: dict[str, int] = {}  # a YAML file's key -> line, for the errors below
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else load_yaml(text, str(p), lines=lines)
    except OSError as err:
        raise UserError(f"{p}: cannot read the GPU table ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{p}:{err.lineno}: not valid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        raise UserError(yaml_problem(err, str(p))) from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the GPU table must map GPU names to {{memory_gb, bf16_tflops, ...}}")
    keys = [f.name for f in fields(GPU) if f.name != "name"]
    for name, entry in data.items():
        at = f"{p}:{lines[str(name)]}" if str(name) in lines else str(p)
        if not isinstance(entry, dict):
            raise UserError(f"{at}: {name}: must be a mapping with keys {', '.join(keys)}")
        base = table.get(str(name))
        values = {k: getattr(base, k) for k in keys} if base else {}
        for k, v in entry.items():
            at_key = f"{p}:{lines[f'{name}.{k}']}" if f"{name}.{k}" in lines else at
            if k not in keys:
                raise UserError(f"{at_key}: {name}.{k}: unknown key; allowed: {', '.join(keys)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise UserError(f"{at_key}: {name}.{k}: must be a positive number, got {v!r}")
            values[k] = float(v)
        missing = [k for k in keys if k not in values]
        if missing:
            raise UserError(f"{at}: {name}: a new GPU needs {', '.join(missing)}")
        table[str(name)] = GPU(str(name), **values)
    return table
