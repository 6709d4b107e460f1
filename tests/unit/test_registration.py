"""Registration files: validation with file/key/allowed names, and version resolution."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soafarm.cli import cli
from soafarm.errors import RegistrationError, ServiceNotFound
from soafarm.registration import Registry, parse_registration
from soafarm.registration.registry import BUILTIN_FOLDER, load_service_class


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_full_file_parses(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "pricer_1.2.toml",
        """
entry_point = "pricer:Pricer"
max_concurrent_calls = 4
service_init_timeout = 5
include_exception_detail_in_faults = true
[environment]
CURVES = "/data/curves"
[broker]
message_resend_limit = 5
""",
    )
    reg = parse_registration(f)
    assert (reg.name, reg.version, reg.entry_point) == ("pricer", "1.2", "pricer:Pricer")
    assert reg.max_concurrent_calls == 4 and reg.service_init_timeout == 5.0
    assert reg.environment == {"CURVES": "/data/curves"}
    assert reg.broker == {"message_resend_limit": 5}
    assert reg.python_path == (tmp_path.resolve(),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'entry_point = "a:B"\nmax_concurent_calls = 1\n',
            ["max_concurent_calls", "unknown key", "max_concurrent_calls"],
        ),
        (
            'entry_point = "a:B"\nmax_concurrent_calls = "4"\n',
            ["max_concurrent_calls", "expected integer"],
        ),
        (
            'entry_point = "a:B"\ninclude_exception_detail_in_faults = 1\n',
            ["include_exception_detail_in_faults", "true or false"],
        ),
        ('entry_point = "not an entry point"\n', ["entry_point", "module:Class"]),
        ('description = "no entry point"\n', ["entry_point", "missing"]),
        (
            'entry_point = "a:B"\n[broker]\nmessage_resend_limt = 1\n',
            ["message_resend_limt", "message_resend_limit"],
        ),
        ('entry_point = "a:B"\n[broker]\nmessage_resend_limit = "x"\n', ["expected int"]),
        ('entry_point = "a:B"\n[environment]\nX = 1\n', ["environment.X", "string"]),
        ("entry_point = \n", ["invalid TOML"]),
    ],
)
def test_bad_files_name_file_key_and_allowed(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    f = write(tmp_path, "svc.toml", text)
    with pytest.raises(RegistrationError) as e:
        parse_registration(f)
    message = str(e.value)
    assert str(f) in message
    for fragment in expected:
        assert fragment in message


def test_bad_file_name(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match=r"<name>_<major>\.<minor>\.toml"):
        parse_registration(write(tmp_path, "svc.v1.toml", 'entry_point = "a:B"\n'))


def test_versions_resolve_unversioned_then_highest(tmp_path: Path) -> None:
    for name in ("echo2_1.0.toml", "echo2_2.0.toml", "echo2_10.1.toml"):
        write(tmp_path, name, 'entry_point = "a:B"\n')
    reg = Registry([tmp_path], include_builtin=False)
    assert reg.resolve("echo2").version == "10.1"
    assert reg.resolve("echo2", "2.0").version == "2.0"
    write(tmp_path, "echo2.toml", 'entry_point = "a:B"\n')
    assert reg.resolve("echo2").version is None
    with pytest.raises(ServiceNotFound, match=r"no version 3\.0; versions available: 1\.0, "):
        reg.resolve("echo2", "3.0")


def test_unknown_service_lists_registered_and_where(tmp_path: Path) -> None:
    with pytest.raises(ServiceNotFound) as e:
        Registry([tmp_path]).resolve("nosuch")
    assert "nosuch" in str(e.value) and "echo" in str(e.value)
    assert "SOAFARM_SERVICE_REGISTRATION_PATH" in str(e.value)


def test_earlier_folders_win_and_broken_files_are_reported(tmp_path: Path) -> None:
    write(tmp_path, "echo.toml", 'entry_point = "mine:Echo"\n')
    write(tmp_path, "broken.toml", "entry_point = 3\n")
    regs, problems = Registry([tmp_path]).scan()
    assert {r.name: r.entry_point for r in regs}["echo"] == "mine:Echo"
    assert [p.path.name for p in problems] == ["broken.toml"]


def test_builtin_examples_load() -> None:
    reg = Registry([]).resolve("echo")
    assert reg.path.parent == BUILTIN_FOLDER
    assert load_service_class(reg).__name__ == "EchoService"


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "good.toml", 'entry_point = "a:B"\n')
    bad = write(tmp_path, "bad.toml", 'entry_point = "a:B"\nbogus = 1\n')
    runner = CliRunner()
    ok = runner.invoke(cli, ["services", "validate", str(good)])
    assert ok.exit_code == 0 and "ok:" in ok.output
    result = runner.invoke(cli, ["services", "validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert "bogus" in result.output and "Traceback" not in result.output


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.builds(
        lambda key, value: f"{key} = {value}\n".encode(),
        st.sampled_from(["entry_point", "python_path", "environment", "broker", "x"]),
        st.sampled_from(['"a:B"', "3", "[1, 2]", '"\u00e9"', "{ a = 1 }", '"\\ud800"', "[[]]"]),
    )
)
def test_any_bytes_as_a_registration_file_are_that_files_problem(
    tmp_path: Path, body: bytes
) -> None:
    path = tmp_path / "svc.toml"
    path.write_bytes(body)
    try:
        parse_registration(path)
    except RegistrationError as e:
        assert str(path) in str(e)  # the error names the file, on one line
        assert "\n" not in str(e).strip()
    # and a scan of the folder reports it instead of failing
    _, problems = Registry((tmp_path,)).scan()
    assert all(p.path == path for p in problems)


def test_a_non_utf8_file_beside_a_good_one_is_reported_and_the_good_one_resolves(
    tmp_path: Path,
) -> None:
    (tmp_path / "latin.toml").write_bytes('entry_point = "a:B"\n# caf\xe9\n'.encode("latin-1"))
    (tmp_path / "good.toml").write_text('entry_point = "echo:EchoService"\n')
    assert Registry((tmp_path,)).resolve("good").entry_point == "echo:EchoService"
    # the session's service is that file: its problem, not "internal broker error"
    with pytest.raises(RegistrationError) as e:
        Registry((tmp_path,)).resolve("latin")
    assert "not UTF-8" in str(e.value) and "latin.toml" in str(e.value)
