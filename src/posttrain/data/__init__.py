"""Data: read files, check rows, render chats into (input_ids, loss_mask), batch and pack, built-in tasks.

The pipeline, one module per stage:

- `readers`: JSONL, JSON, CSV, Parquet and `datasets` folders -> located records (`read_records`);
- `schema`: row shapes and their checks -> normalised rows or one `DataError` listing every problem
  (`load_rows`, `validate_file`);
- `render`: chat template -> `Rendered(input_ids, loss_mask, truncated)`, the single source of truth for
  which tokens are trained (`render_sft`, `render_prompt`, `render_dataset`);
- `collate`: padded batches (`collate`) and packed rows that keep examples apart (`pack`, `collate_packed`);
- `tasks`: seeded generators with verifiers (`TASKS`, `write_jsonl`).

See docs/data.md.
"""

from posttrain.data.collate import collate, collate_packed, pack
from posttrain.data.readers import Record, read_records
from posttrain.data.render import Rendered, render_dataset, render_prompt, render_sft
from posttrain.data.schema import KINDS, Row, load_rows, validate_file
from posttrain.data.tasks import TASKS, Task, write_jsonl

__all__ = [
    "KINDS",
    "TASKS",
    "Record",
    "Rendered",
    "Row",
    "Task",
    "collate",
    "collate_packed",
    "load_rows",
    "pack",
    "read_records",
    "render_dataset",
    "render_prompt",
    "render_sft",
    "validate_file",
    "write_jsonl",
]
