"""Data: read files, check rows, render chats into (input_ids, loss_mask), batch and pack, built-in tasks.

The pipeline, one module per stage:

- `readers`: JSONL, JSON, CSV, Parquet and `datasets` folders -> located records (`read_records`);
- `schema`: row shapes and their checks -> normalised rows or one `DataError` listing every problem
  (`load_rows`, `validate_file`, `row_shapes`);
- `render`: chat template -> `Rendered(input_ids, loss_mask, truncated)`, the single source of truth for
  which tokens are trained (`render_sft`, `render_prompt`, `render_dataset`);
- `collate`: padded batches (`collate`) and packed rows that keep examples apart (`pack`, `collate_packed`);
- `preference`: preference rows -> `RenderedPair(prompt_ids, chosen_ids, rejected_ids, ...)` through `render_sft`
  (`render_pair`, `render_preference_dataset`), and chosen-then-rejected batches (`collate_pairs`);
- `tasks`: seeded generators with verifiers (`TASKS`, `write_jsonl`), their preference pairs (`make_pairs`) and
  prompt rows (`make_prompts`);

See docs/data.md.
"""

from posttrain.data.collate import collate, collate_packed, pack
from posttrain.data.preference import RenderedPair, collate_pairs, render_pair, render_preference_dataset
from posttrain.data.readers import Record, read_records
from posttrain.data.render import Rendered, render_dataset, render_prompt, render_sft
from posttrain.data.schema import KINDS, Row, load_rows, plain_messages, row_shapes, validate_file
from posttrain.data.tasks import REJECTED_KINDS, TASKS, Task, make_pairs, make_prompts, write_jsonl

__all__ = [
    "KINDS",
    "REJECTED_KINDS",
    "TASKS",
    "Record",
    "Rendered",
    "RenderedPair",
    "Row",
    "Task",
    "collate",
    "collate_packed",
    "collate_pairs",
    "load_rows",
    "make_pairs",
    "make_prompts",
    "pack",
    "plain_messages",
    "read_records",
    "render_dataset",
    "render_pair",
    "render_preference_dataset",
    "render_prompt",
    "render_sft",
    "row_shapes",
    "validate_file",
    "write_jsonl",
]
