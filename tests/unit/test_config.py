"""Settings: defaults < TOML file < env < options; unknown keys rejected; secrets masked."""

from pathlib import Path

import pytest

from soafarm.config import load_settings, settings_env
from soafarm.errors import ConfigError


def test_defaults_are_the_seeds() -> None:
    s = load_settings(environ={})
    assert s.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.namespace == "soafarm"
    assert s.broker.message_resend_limit == 3
    assert s.broker.message_throttle_start_threshold == 5120
    assert s.broker.message_throttle_stop_threshold == 3840
    assert s.broker.client_idle_timeout == 300.0
    assert s.broker.session_idle_timeout == 0.0


def test_file_then_env_then_options(tmp_path: Path) -> None:
    f = tmp_path / "soafarm.toml"
    f.write_text(
        'namespace = "fromfile"\nredis_url = "redis://file:1/0"\n'
        "[broker]\nmessage_resend_limit = 7\n"
    )
    env = {"SOAFARM_REDIS_URL": "redis://env:2/0", "SOAFARM_BROKER_CLIENT_IDLE_TIMEOUT": "12.5"}
    s = load_settings(f, {"namespace": "fromoption", "amqp_url": None}, environ=env)
    assert s.namespace == "fromoption"
    assert s.redis_url == "redis://env:2/0"
    assert s.broker.message_resend_limit == 7
    assert s.broker.client_idle_timeout == 12.5


def test_config_file_from_env_variable(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('namespace = "viaenv"\n')
    assert load_settings(environ={"SOAFARM_CONFIG": str(f)}).namespace == "viaenv"


def test_unknown_key_in_file_names_file_key_and_allowed(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[broker]\nmessage_resend_limt = 2\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f, environ={})
    text = str(e.value)
    assert str(f) in text and "message_resend_limt" in text and "message_resend_limit" in text


def test_wrong_type_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[client]\nrequest_batch_size = "many"\n')
    with pytest.raises(ConfigError, match="request_batch_size: expected int"):
        load_settings(f, environ={})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("namespace = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(f, environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_unknown_env_variable_is_rejected() -> None:
    with pytest.raises(ConfigError, match="SOAFARM_NAMESAPCE"):
        load_settings(environ={"SOAFARM_NAMESAPCE": "x"})


def test_password_masked_in_repr_and_show() -> None:
    s = load_settings(
        environ={
            "SOAFARM_AMQP_URL": "amqp://u:hunter2@h:5672/",
            "SOAFARM_REDIS_URL": "redis://:hunter3@h:6379/0",
        }
    )
    assert "hunter2" not in repr(s) and "hunter3" not in repr(s)
    shown = s.as_dict()
    assert shown["amqp_url"] == "amqp://u:**@h:5672/"
    assert "hunter3" not in shown["redis_url"]


def test_registration_path_is_a_path_list(tmp_path: Path) -> None:
    s = load_settings(environ={"SOAFARM_SERVICE_REGISTRATION_PATH": f"{tmp_path}:/other"})
    assert s.service_registration_path == (tmp_path, Path("/other"))


def test_settings_env_rebuilds_the_same_settings(tmp_path: Path) -> None:
    s = load_settings(
        environ={
            "SOAFARM_NAMESPACE": "x",
            "SOAFARM_WORKER_CORES": "3",
            "SOAFARM_SERVICE_REGISTRATION_PATH": str(tmp_path),
        }
    )
    assert load_settings(environ=settings_env(s)) == s


def test_bad_namespace_is_rejected() -> None:
    with pytest.raises(ConfigError, match="namespace"):
        load_settings(environ={"SOAFARM_NAMESPACE": "a b"})


def test_submit_prints_the_exact_resume_command() -> None:
    from soafarm.cli.batch import _resume_command

    assert _resume_command("pricer", 7, "nightly", "in.jsonl", None) == (
        "soafarm submit pricer --session 7 --client-id nightly --input in.jsonl"
    )
    assert _resume_command("echo", 3, "default", None, ("echo", "1:100")) == (
        "soafarm submit echo --session 3 --client-id default --sweep echo 1:100"
    )
