"""The benchmark table: each peer's ratio to soafarm's figure of the same name."""

from benchmarks.common import Figure, render, render_pair


def _row(table: str, system: str, name: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(name) and system in line)


def test_ratios_say_how_many_times_better_soafarm_is() -> None:
    figures = [
        Figure("echo (req/s)", "soafarm", "req/s", True, "", [60_000.0, 66_000.0, 70_000.0]),
        Figure("p50 (ms)", "soafarm", "ms", False, "", [0.9, 0.92, 1.0]),
        Figure("echo (req/s)", "raw pika", "req/s", True, "", [5_500.0]),
        Figure("p50 (ms)", "raw pika", "ms", False, "", [0.61]),
    ]
    table = render(figures, "title")
    assert _row(table, "raw pika", "echo").endswith("12.0x")  # 66,000 / 5,500
    # theirs / ours, with two decimals: 0.61 / 0.92 is 0.66, just outside "within 1.5x".
    assert _row(table, "raw pika", "p50").endswith("0.66x")
    assert "0.90-1.00" in _row(table, "soafarm", "p50")
    assert "60,000.0-70,000.0" in _row(table, "soafarm", "echo")


def test_a_pair_table_shows_each_sides_median_and_the_ratio_of_the_second_to_the_first() -> None:
    figures = {
        ("latency p50 (ms)", "before"): [1.0, 2.0, 3.0],
        ("latency p50 (ms)", "after"): [3.0, 4.0, 5.0],
    }
    table = render_pair(figures, ["before", "after"], "title")
    title, header, row = table.splitlines()
    assert title == "title" and header.split()[-3:] == ["before", "after", "ratio"]
    assert row.split()[-5:] == ["2.00", "(1.00-3.00)", "4.00", "(3.00-5.00)", "2.00"]
