"""`redis+sentinel://` URLs: parsed, or refused with a line that shows the right form."""

from __future__ import annotations

import pytest

from soafarm.errors import ConfigError
from soafarm.transport.redis_urls import is_sentinel, parse_sentinel_url


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_db() -> None:
    url = parse_sentinel_url("redis+sentinel://:p%40w@a:1,b:2,c/mymaster/3")
    assert url.sentinels == (("a", 1), ("b", 2), ("c", 26379))
    assert (url.master, url.db, url.username, url.password) == ("mymaster", 3, None, "p@w")
    assert parse_sentinel_url("redis+sentinel://u:pw@a:1/m").db == 0
    assert parse_sentinel_url("redis+sentinel://u:pw@a:1/m").username == "u"
    assert is_sentinel("REDIS+SENTINEL://a:1/m") and not is_sentinel("redis://a:1/0")


@pytest.mark.parametrize(
    "bad", ["redis+sentinel://a:1/", "redis+sentinel://a:x/m", "redis+sentinel://a:1/m/0/1"]
)
def test_a_bad_sentinel_url_is_a_config_error_showing_the_form(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"redis_url: .*redis\+sentinel://host1:26379"):
        parse_sentinel_url(bad)
