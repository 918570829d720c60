"""The one Markdown table renderer."""

from jaguar_reid.text import markdown_table


def test_markdown_table_rows_and_blank_cells():
    table = markdown_table(["fold", "", "mAP"], [["0", "", "0.5000"], [1, None, 0.25]])
    assert table == ("| fold |  | mAP |\n"
                     "|---|---|---|\n"
                     "| 0 |  | 0.5000 |\n"
                     "| 1 | None | 0.25 |")


def test_markdown_table_without_rows_is_the_header():
    assert markdown_table(["step", "kept"], []) == "| step | kept |\n|---|---|"


def test_markdown_table_escapes_pipes_and_newlines():
    table = markdown_table(["a|b"], iter([["x|y\nz"]]))
    assert table == "| a\\|b |\n|---|\n| x\\|y z |"
