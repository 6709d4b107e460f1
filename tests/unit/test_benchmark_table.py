"""The benchmark table: each peer's ratio to soafarm's figure of the same name."""

from benchmarks.common import Figure, render


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
