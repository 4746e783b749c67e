"""A data file's own column names: `data.columns` renames them to the fields posttrain reads, and
`data.ignore_columns` leaves columns out (`--column OURS=THEIRS` and `--ignore-column NAME` on the command line).

Most files people have were not written for posttrain: ``question``/``answer`` where an SFT row reads
``prompt``/``completion``, or a ``source`` column that an SFT or preference row refuses as unknown. A `Columns`
maps each row before it is checked, so every check, error and count stays the same; problems are reported under the
file's own column names (`Columns.file_field`), so ``FILE:LINE: question: must be a string`` points at what the
user can see in the file. A rename is one column to one field, never several columns joined into one (an Alpaca
row's ``instruction`` and ``input``: join them in the file first).

Nothing here is silent: a column named in either setting that no row of a file has is refused for that file
(`Columns.unused`), and a row that holds both a renamed column and a column already called by the field it is
renamed to is refused (which one to read would be a guess).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Columns:
    """`rename`: posttrain's field -> the file's column (``{"prompt": "question"}``); `ignore`: the file's columns
    to leave out. `cli`: given as ``--column``/``--ignore-column`` (named so in messages), not by a run's config.

    >>> c = Columns({"prompt": "question", "completion": "answer"}, ("source",))
    >>> c.apply({"question": "2+2?", "answer": "4", "source": "gsm8k"})
    ({'prompt': '2+2?', 'completion': '4'}, [])
    >>> c.file_field("prompt[0].content"), c.file_field("id"), c.file_field(None)
    ('question[0].content', 'id', None)
    """

    rename: Mapping[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    cli: bool = False

    def __bool__(self) -> bool:
        return bool(self.rename or self.ignore)

    @property
    def source(self) -> tuple[str, str]:
        """The two settings' names as the user gave them."""
        return ("--column", "--ignore-column") if self.cli else ("data.columns", "data.ignore_columns")

    def leave_out(self, names: list[str]) -> str:
        """How to leave `names` out, as the user would write it.

        >>> Columns().leave_out(["a", "b"]), Columns(cli=True).leave_out(["a", "b"])
        ('data.ignore_columns: [a, b]', '--ignore-column a --ignore-column b')
        """
        return " ".join(f"--ignore-column {n}" for n in names) if self.cli else f"data.ignore_columns: [{', '.join(names)}]"

    def apply(self, data: dict) -> tuple[dict, list[tuple[str, str]]]:
        """The row with posttrain's field names, and (field, message) for each clash: a column that is already
        called what another column is renamed to (unless that column is itself renamed or ignored)."""
        renamed_from = set(self.rename.values())
        out: dict = {}
        clashes: list[tuple[str, str]] = []
        for key, value in data.items():
            if key in self.ignore or key in renamed_from:
                continue
            if key in self.rename and self.rename[key] in data:
                clashes.append((key, f"this row has both {key} and {self.rename[key]}, which {self.source[0]} reads "
                                     f"as {key}: leave one out ({self.leave_out([key])})"))  # fmt: skip
                continue
            out[key] = value
        for ours, theirs in self.rename.items():
            if theirs in data:
                out[ours] = data[theirs]
        return out, clashes

    def file_field(self, name: str | None) -> str | None:
        """A problem's field (posttrain's name, e.g. ``prompt[1].content``) as the file calls it."""
        if not name:
            return name
        head, sep, rest = _split(name)
        return self.rename.get(head, head) + sep + rest

    def unused(self, seen: Iterable[str]) -> list[str]:
        """Messages for each column named in either setting that no row had (`seen`: every column of the file)."""
        seen = set(seen)
        out = [f"{self.source[0]} reads {ours} from column {theirs!r}, which no row has"
               for ours, theirs in self.rename.items() if theirs not in seen]  # fmt: skip
        out += [f"{self.source[1]} names column {name!r}, which no row has" for name in self.ignore if name not in seen]
        if out and seen:
            out[-1] += f" (its columns: {', '.join(sorted(seen))})"
        return out


# Column names that often hold a field, most likely first (a suggestion in an error message; never applied).
_OFTEN = {
    "prompt": ("question", "instruction", "query", "problem", "input", "prompt_text"),
    "completion": ("answer", "output", "response", "solution", "target", "reply"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "better", "accepted"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "worse"),
    "answer": ("solution", "final_answer", "ground_truth", "gold", "label", "target"),
}


def guess_columns(kind: str, columns: set[str]) -> dict[str, str]:
    """Renames the names of a file's `columns` suggest for `kind`, where they give every field a row shape needs
    (else none): SFT ``prompt``/``completion``, preference ``prompt``/``chosen``/``rejected``, prompts ``prompt``
    (and ``answer``).

    >>> guess_columns("sft", {"question", "answer", "source"})
    {'prompt': 'question', 'completion': 'answer'}
    >>> guess_columns("prompts", {"problem", "solution"})
    {'prompt': 'problem', 'answer': 'solution'}
    >>> guess_columns("sft", {"question", "notes"})
    {}
    """
    wanted = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
              "prompts": ("prompt", "answer")}[kind]  # fmt: skip
    free, out = set(columns), {}
    for name in wanted:
        if name in columns:  # already called so
            free.discard(name)
            continue
        found = next((c for c in _OFTEN[name] if c in free), None)
        if found is not None:
            out[name] = found
            free.discard(found)
    needed = [f for f in wanted if f != "answer"]
    return out if all(f in out or f in columns for f in needed) and out else {}


def run_columns(cfg) -> Columns:
    """A run config's `data.columns` and `data.ignore_columns`."""
    return Columns(dict(cfg.data.columns), tuple(cfg.data.ignore_columns))


def _split(name: str) -> tuple[str, str, str]:
    """
    >>> _split("prompt[1].content"), _split("text")
    (('prompt', '[', '1].content'), ('text', '', ''))
    """
    cut = min((i for i in (name.find("["), name.find(".")) if i >= 0), default=len(name))
    return name[:cut], name[cut : cut + 1], name[cut + 1 :]
