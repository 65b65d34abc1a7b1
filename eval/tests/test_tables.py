import pytest

from classynet_eval.tables import TableError, markdown, ms, partition_of, pct, times


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


def test_each_model_runs_its_own_partition_and_bn_gating_runs_bns():
    budget = {"partition": "E2", "by_model": {"bn": {"partition": "E2"}, "cn+c": {"partition": "E1"}}}
    assert partition_of(budget, "cn+c") == "E1"
    assert partition_of(budget, "bn+gate") == "E2"
    # A model the budget does not list, and results written before `by_model`, run the row's cut.
    assert partition_of(budget, "cn") == "E2"
    assert partition_of({"partition": "E4"}, "cn+c") == "E4"
