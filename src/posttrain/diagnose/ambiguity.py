"""The data-ambiguity probe: SFT demonstrations that disagree with each other, or with the verifier.

**Near-duplicate prompts.** A prompt's text (every message before its last assistant turn) is normalised:
lowercase, every run of characters other than letters and digits becomes one space (digits are kept: "5 apples"
and "6 apples" are different problems). Two prompts are near-duplicates when their normalised texts hold the same
numbers in the same order and the Jaccard similarity of their word sets (|A and B| / |A or B|) is at least
`threshold` (default 0.8: a paraphrase that changes a word or two of a 15-word prompt; equal texts score 1).
Near-duplicates are grouped transitively (union-find) into clusters. Rows that carry an ``answer`` (a task's rows)
are near-duplicates only of rows with the same answer, unless their prompts are the same text: the data says
itself that they are other problems (a long shared instruction made the built-in task's "buys 3 more", "gives
away 3" and "multiplies by 3" near-duplicates, and 9% of a clean file "ambiguous"). A cluster is *ambiguous* when its responses,
normalised the same way, are not all equal: SFT then fits conflicting targets for one input. Comparisons are made
only between prompts with the same numbers, so the cost is quadratic in the largest such group, not the file.

**Wrong demonstrations.** Each response is checked by the verifier against its row (only rows it can check: a
task's verifier needs an ``answer``): the share it rejects is the share of demonstrations that teach a wrong answer.

**Length spread.** For each duplicate cluster, the relative range of its responses' lengths in words,
(max - min) / mean: near-identical prompts answered at very different lengths.

`text` rows (no prompt) are counted and left out. Pure functions; the verifier is the only thing called.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_NON_WORD = re.compile(r"[^0-9a-z]+")
EXAMPLES = 5  # clusters shown in reports


def normalise_text(text: str) -> str:
    """Lowercase, runs of anything but letters and digits as one space.

    >>> normalise_text("  Sam has 5 apples!\\nHow many?  ")
    'sam has 5 apples how many'
    """
    return _NON_WORD.sub(" ", text.lower()).strip()


def jaccard(a: set, b: set) -> float:
    """|a and b| / |a or b| (1 for two empty sets).

    >>> jaccard({"a", "b", "c"}, {"a", "b", "d"})
    0.5
    """
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def last_turn(row: dict) -> tuple[list[dict], str] | None:
    """The messages before the last assistant turn, and that turn's text, of a normalised SFT row; None for a
    ``text`` row.

    >>> last_turn({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    ([{'role': 'user', 'content': 'q'}], 'a')
    """
    messages = row.get("messages")
    if not messages:
        return None
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def prompt_and_response(row: dict) -> tuple[str, str] | None:
    """`last_turn` as text: the prompt's messages joined by newlines, and the response.

    >>> prompt_and_response({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
    ...                                   {"role": "assistant", "content": "a"}]})
    ('s\\nq', 'a')
    """
    turn = last_turn(row)
    return None if turn is None else ("\n".join(m["content"] for m in turn[0]), turn[1])


def duplicate_clusters(prompts: Sequence[str], threshold: float = 0.8) -> list[list[int]]:
    """Groups (of two or more indices into `prompts`) of near-duplicate prompts (module docstring), each sorted,
    largest first.

    >>> duplicate_clusters(["Sam has 5 apples. How many?", "sam has 5 apples - how many", "Sam has 6 apples."])
    [[0, 1]]
    >>> duplicate_clusters(["a b c d e", "a b c d f", "a b c d f g"], threshold=0.6)
    [[0, 1, 2]]
    """
    words, blocks = [], {}
    for i, p in enumerate(prompts):
        tokens = normalise_text(p).split()
        words.append(set(tokens))
        numbers = tuple(t for t in tokens if any(ch.isdigit() for ch in t))
        blocks.setdefault(numbers, []).append(i)
    parent = list(range(len(prompts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for members in blocks.values():
        for x, i in enumerate(members):
            for j in members[x + 1 :]:
                if root(i) != root(j) and jaccard(words[i], words[j]) >= threshold:
                    parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def length_spread(responses: Sequence[str]) -> float:
    """(max - min) / mean of the responses' lengths in words (0 when they are all empty).

    >>> length_spread(["a b", "a b c d", "a b c d e f"])
    1.0
    """
    lengths = [len(r.split()) for r in responses]
    mean = sum(lengths) / len(lengths)
    return (max(lengths) - min(lengths)) / mean if mean else 0.0


@dataclass
class DataAmbiguity:
    """What the SFT data probe found (module docstring)."""

    file: str
    rows: int
    text_rows: int  # rows with no prompt (plain text), left out
    threshold: float
    duplicate_clusters: int
    duplicate_rows: int
    ambiguous_clusters: int
    ambiguous_rows: int
    length_spread_mean: float | None  # over duplicate clusters
    checked: int  # responses the verifier could check
    wrong: int  # of those, rejected
    clusters: list[dict] = field(default_factory=list)  # the largest ambiguous clusters: lines, prompts, responses
    wrong_lines: list = field(default_factory=list)  # the first rejected rows' lines

    @property
    def ambiguous_share(self) -> float:
        return self.ambiguous_rows / max(self.rows - self.text_rows, 1)

    @property
    def wrong_share(self) -> float | None:
        return self.wrong / self.checked if self.checked else None


def measure_ambiguity(file: str, rows: Sequence[dict], check=None, *, threshold: float = 0.8) -> DataAmbiguity:
    """Near-duplicates, ambiguous clusters and length spread of normalised SFT `rows`; with `check(rows,
    responses) -> list[bool | None]` (None: cannot check that row), the wrong demonstrations.

    >>> rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "answer": n}
    ...         for q, a, n in (("2+2?", "4", 4), ("2 + 2 ?", "5", 4), ("3+3?", "6", 6))]
    >>> d = measure_ambiguity("f", rows, lambda rs, cs: [c == str(r["answer"]) for r, c in zip(rs, cs)])
    >>> d.duplicate_clusters, d.ambiguous_rows, d.wrong, d.checked
    (1, 2, 1, 3)
    """
    pairs = [(i, prompt_and_response(r)) for i, r in enumerate(rows)]
    usable = [(i, pr) for i, pr in pairs if pr is not None]
    clusters = [[usable[j][0] for j in c] for c in duplicate_clusters([pr[0] for _, pr in usable], threshold)]
    prompt = {i: normalise_text(pr[0]) for i, pr in usable}
    clusters = sorted((part for c in clusters for part in _by_answer(c, rows, prompt)), key=lambda g: (-len(g), g[0]))
    response = {i: pr[1] for i, pr in usable}
    ambiguous = [c for c in clusters if len({normalise_text(response[i]) for i in c}) > 1]
    spreads = [length_spread([response[i] for i in c]) for c in clusters]
    verdicts = check([rows[i] for i, _ in usable], [pr[1] for _, pr in usable]) if check else []
    judged = [(usable[j][0], v) for j, v in enumerate(verdicts) if v is not None]
    wrong = [i for i, v in judged if not v]
    return DataAmbiguity(
        file=file, rows=len(rows), text_rows=len(rows) - len(usable), threshold=threshold,
        duplicate_clusters=len(clusters), duplicate_rows=sum(map(len, clusters)),
        ambiguous_clusters=len(ambiguous), ambiguous_rows=sum(map(len, ambiguous)),
        length_spread_mean=sum(spreads) / len(spreads) if spreads else None,
        checked=len(judged), wrong=len(wrong),
        clusters=[{"lines": [_line(rows[i], i) for i in c], "prompts": [_prompt_text(rows[i]) for i in c],
                   "responses": [response[i] for i in c], "length_spread": length_spread([response[i] for i in c])}
                  for c in ambiguous[:EXAMPLES]],
        wrong_lines=[_line(rows[i], i) for i in wrong[:EXAMPLES]],
    )  # fmt: skip


def _by_answer(cluster: list[int], rows: Sequence[dict], prompt: dict[int, str]) -> list[list[int]]:
    """A cluster of near-duplicate prompts split by the rows' own ``answer`` where every row has one (module
    docstring); rows whose prompts are the same text stay together whatever their answers (a conflict).

    >>> rows = [{"answer": 10}, {"answer": 4}, {"answer": 10}, {"answer": 7}]
    >>> _by_answer([0, 1, 2, 3], rows, {0: "a", 1: "b", 2: "c", 3: "b"})
    [[0, 2], [1, 3]]
    """
    if not all(isinstance(rows[i], dict) and "answer" in rows[i] for i in cluster):
        return [cluster]
    groups: dict[str, list[int]] = {}
    for i in cluster:
        groups.setdefault(repr(rows[i]["answer"]), []).append(i)
    parts = [g for g in groups.values() if len(g) > 1]
    same_text: dict[str, list[int]] = {}
    for i in cluster:
        same_text.setdefault(prompt[i], []).append(i)
    parts += [g for g in same_text.values() if len({repr(rows[i]["answer"]) for i in g}) > 1]
    return [sorted(p) for p in parts]


def _prompt_text(row: dict) -> str:
    pr = prompt_and_response(row)
    return pr[0] if pr else ""


def _line(row: dict, index: int) -> int:
    """The row's line in its file (`schema.Row.line`), else its 1-based position."""
    return getattr(row, "line", None) or index + 1
