"""`PreparedData.longest_rows`: which examples run past a model's positions (`train._check_context`)."""

from posttrain.data.preference import RenderedPair
from posttrain.data.prepared import PreparedData
from posttrain.data.prompts import PromptExample
from posttrain.data.render import Rendered


def _row(n: int) -> Rendered:
    return Rendered([1] * n, [1] * n)


def test_each_example_of_a_packed_row_is_measured_with_or_without_file_lines():
    packed = [[_row(10), _row(900)], [_row(5)]]
    assert PreparedData(train=packed, collate=list, train_lines=[(3, 8), (9,)]).longest_rows(512) == [8]
    assert PreparedData(train=packed, collate=list).longest_rows(512) == [1]  # by position: packed row 1


def test_pairs_prompts_and_the_evaluation_examples():
    pair = RenderedPair([1] * 300, [2] * 100, [3] * 250)  # prompt + the longer side: 550
    prompt = PromptExample(prompt_ids=[1] * 500, prompt="q", columns={}, messages=[], line=4)
    data = PreparedData(train=[pair, RenderedPair([1] * 3, [2], [3])], collate=list, train_lines=[(2,), (5,)],
                        eval=[_row(3), _row(600)])  # fmt: skip
    assert data.longest_rows(512) == [2] and data.longest_rows(550) == []
    assert data.longest_rows(512, evaluation=True) == [2]  # the second evaluation example, by position
    rl = PreparedData(train=[prompt], collate=list, train_lines=[(4,)])
    assert rl.longest_rows(512) == [] and rl.longest_rows(512, new_tokens=13) == [4]
