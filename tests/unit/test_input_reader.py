"""The CLI's input reader (`soafarm submit --input`, `--sweep`) on any input: a request, or
one ConfigError naming the line, never anything else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soafarm.cli.batch import parse_request_line, parse_sweep
from soafarm.errors import ConfigError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


def _one_line_error(text: str) -> None:
    try:
        op, args, kwargs, _ = parse_request_line(text, "input line 7")
    except ConfigError as e:
        assert str(e).startswith("input line 7: ")
    else:
        assert isinstance(op, str) and op
        assert isinstance(args, list) and isinstance(kwargs, dict)


@given(st.text(max_size=200))
def test_any_text_is_a_request_or_one_error(text: str) -> None:
    _one_line_error(text)


@given(st.dictionaries(st.sampled_from(["op", "args", "kwargs", "user_data", "extra"]), JSON))
def test_any_json_object_is_a_request_or_one_error(item: dict[str, Any]) -> None:
    _one_line_error(json.dumps(item))


def test_json_nested_beyond_the_parser_is_one_error_not_a_recursion_crash() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_request_line("[" * 100_000 + "]" * 100_000, "input line 1")


@given(st.text(max_size=30))
def test_any_sweep_spec_is_a_range_or_one_error(spec: str) -> None:
    try:
        swept = parse_sweep(spec)
    except ConfigError as e:
        assert "--sweep" in str(e)
    else:
        assert swept.step > 0
