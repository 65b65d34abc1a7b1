import pytest

from classynet_eval.tables import TableError, markdown, ms, pct, times


def test_markdown_layout():
    t = markdown(["model", "acc", "time"], [["cn|c", pct(0.9168), ms(1.23456)], ["bn", None, times(7.514)]])
    assert t == (
        "| model | acc | time |\n"
        "|:--|--:|--:|\n"
        "| cn\\|c | 91.68 % | 1,235 |\n"
        "| bn | – | 7.51× |\n"
    )


def test_alignment_and_shape_errors():
    assert markdown(["a", "b"], [[1, 2]], align="cl").splitlines()[1] == "|:-:|:--|"
    with pytest.raises(TableError, match="row 2 has 1 cells, the header has 2"):
        markdown(["a", "b"], [[1, 2], [3]])
    with pytest.raises(TableError, match="one of l/r/c per column"):
        markdown(["a", "b"], [], align="x")
