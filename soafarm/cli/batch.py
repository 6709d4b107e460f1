"""Batch commands: `submit` requests, `attach` to watch progress, collect `responses`."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import redis

from soafarm.cli import cli, with_settings
from soafarm.cli.output import emit_json, emit_table
from soafarm.cli.progress import LiveProgress
from soafarm.config import Settings
from soafarm.errors import ConfigError, ConnectionFailed, SoafarmError
from soafarm.logs import say
from soafarm.protocol import Response

if TYPE_CHECKING:
    from soafarm.client.broker_client import BrokerClient

_REQUEST_KEYS = {"op", "args", "kwargs", "user_data"}


def parse_request_line(text: str, where: str) -> tuple[str, list[Any], dict[str, Any], Any]:
    """One JSON-lines request: {"op": ..., "args": [...], "kwargs": {...}, "user_data": ...}."""
    try:
        item = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a JSON object with an 'op' key")
    unknown = set(item) - _REQUEST_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
            f"{', '.join(sorted(_REQUEST_KEYS))}"
        )
    op, args, kwargs = item.get("op"), item.get("args", []), item.get("kwargs", {})
    if not isinstance(op, str) or not op:
        raise ConfigError(f"{where}: 'op' must be a non-empty string")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: 'args' must be a list and 'kwargs' an object")
    return op, args, kwargs, item.get("user_data")


def parse_sweep(spec: str) -> range:
    """`START:END[:STEP]`, END included (as HPC Pack's parametric sweeps)."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
        raise ConfigError(f"--sweep range {spec!r} must be START:END or START:END:STEP, STEP > 0")
    start, end = parts[0], parts[1]
    step = parts[2] if len(parts) == 3 else 1
    return range(start, end + 1, step)


Request = tuple[str, list[Any], dict[str, Any], Any]


def _requests(
    input_file: str | None, sweep: tuple[str, str] | None, files: contextlib.ExitStack
) -> tuple[Iterator[Request], int]:
    """The requests to send and how many there are, every one checked before any is sent:
    a bad line or an empty sweep is reported before a session exists."""
    if sweep is not None:
        op, spec = sweep
        indexes = parse_sweep(spec)
        if not indexes:
            raise ConfigError(f"--sweep {op} {spec} has no index: END is below START")
        return ((op, [i], {}, i) for i in indexes), len(indexes)
    if input_file is None:
        raise ConfigError(
            "give the requests with --input FILE (JSON lines, '-' for stdin) or --sweep"
        )
    if input_file == "-":
        # spooled to a temporary file (closed with `files`) while checked: stdin can be read once
        spool = files.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))  # noqa: SIM115
        total = _check_lines(sys.stdin, "stdin", spool)
        spool.seek(0)
        return _parsed(spool, "stdin"), total
    path = Path(input_file)
    if not path.is_file():
        raise ConfigError(f"--input {input_file}: file not found")
    with path.open(encoding="utf-8") as fh:
        total = _check_lines(fh, input_file)
    return _parsed(files.enter_context(path.open(encoding="utf-8")), input_file), total


def _check_lines(stream: IO[str], name: str, copy: IO[str] | None = None) -> int:
    """Parse every request line of `stream` (ConfigError naming the first bad one), copying
    them to `copy`; returns how many there are."""
    count = 0
    try:
        for number, text in enumerate(stream, start=1):
            if text.strip():
                parse_request_line(text, f"{name}:{number}")
                count += 1
                if copy is not None:
                    copy.write(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text ({e.reason})") from None
    if not count:
        raise ConfigError(f"{name}: no requests (one JSON object a line)")
    return count


def _parsed(stream: IO[str], name: str) -> Iterator[Request]:
    for number, text in enumerate(stream, start=1):
        if text.strip():
            yield parse_request_line(text, f"{name}:{number}")


def _resume_command(
    service: str,
    session_id: int,
    client_id: str,
    input_file: str | None,
    sweep: tuple[str, str] | None,
) -> str:
    """The command that continues an interrupted submit where RabbitMQ's confirms stopped."""
    what = f"--sweep {sweep[0]} {sweep[1]}" if sweep else f"--input {input_file}"
    return f"soafarm submit {service} --session {session_id} --client-id {client_id} {what}"


@cli.command()
@with_settings
@click.argument("service")
@click.option("--durable", is_flag=True, help="Persist requests and responses (collect later).")
@click.option("--client-id", default="default", show_default=True, help="This batch's client id.")
@click.option("--input", "input_file", help="JSON-lines requests file, or '-' for stdin.")
@click.option(
    "--sweep",
    nargs=2,
    metavar="OP START:END[:STEP]",
    help="One request OP(index) per index, END included.",
)
@click.option(
    "--session",
    "session_id",
    type=int,
    help="Add to (or resume) this session instead of creating one.",
)
@click.option("--version", "version", help="Service version, like 1.0.")
@click.option("--min-units", type=click.IntRange(min=0), help="Default: the job template's (1).")
@click.option("--max-units", type=click.IntRange(min=1), help="Default: the job template's (all).")
@click.option(
    "--job-template", default="", help="Job template to apply (`soafarm templates list`)."
)
@click.option(
    "--priority",
    help="lowest, below_normal, normal, above_normal, highest or 0..4000 (default: the "
    "job template's, normal).",
)
@click.option(
    "--node-group",
    "node_groups",
    multiple=True,
    help="Run only on hosts in this node group (a pool, a label key or key=value); repeat "
    "for hosts in all of them.",
)
@click.option(
    "--fail-if-queued",
    is_flag=True,
    help="Fail (and close the session) if the farm cannot give its minimum now.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def submit(  # noqa: PLR0917 - click passes every option by name
    settings: Settings,
    service: str,
    durable: bool,
    client_id: str,
    input_file: str | None,
    sweep: tuple[str, str] | None,
    session_id: int | None,
    version: str | None,
    min_units: int | None,
    max_units: int | None,
    job_template: str,
    priority: str | None,
    node_groups: tuple[str, ...],
    fail_if_queued: bool,
    as_json: bool,
) -> None:
    """Send a batch of requests to SERVICE, seal it, print the session id and exit.

    With --session and the --client-id of an interrupted submit, the requests RabbitMQ already
    accepted are skipped (request N is line N), so the batch resumes where it stopped.
    """
    from soafarm.client.broker_client import BrokerClient
    from soafarm.client.session import DurableSession, Session, SessionStartInfo, attach_session

    if not durable and session_id is None:
        raise ConfigError(
            "an interactive session closes when its last client leaves, so its responses could "
            "not be collected later: use --durable"
        )
    with contextlib.ExitStack() as files:  # the input file (or stdin's spool)
        requests, total = _requests(input_file, sweep, files)
        if session_id is not None:
            session = attach_session(session_id, settings)
            if not session.durable:
                session.detach()
                raise ConfigError(
                    f"session {session_id} is interactive: submit to a durable session"
                )
        else:
            kind = DurableSession if durable else Session
            info = SessionStartInfo(
                service,
                version=version,
                min_units=min_units,
                max_units=max_units,
                job_template=job_template,
                priority=priority,
                node_groups=node_groups or None,
                fail_if_queued=fail_if_queued,
            )
            session = kind.create(info, settings)
        resume = _resume_command(service, session.id, client_id, input_file, sweep)
        try:
            with BrokerClient(session, client_id) as client:
                skip = client.sent  # resuming: these were accepted before
                with LiveProgress("requests") as bar:
                    sending = f"sending to session {session.id}"
                    bar.add("send", sending, total=total, faults=False)

                    def throttled(outstanding: int) -> None:
                        waiting = f"throttled: {outstanding:,} outstanding, waiting"
                        bar.update("send", description=waiting if outstanding else sending)

                    client.on_throttled(throttled)
                    for index, (op, args, kwargs, user_data) in enumerate(requests):
                        if index >= skip:
                            client.send_request(op, *args, user_data=user_data, **kwargs)
                        bar.update("send", completed=index + 1)
                    client.end_requests()
                sent = client.sent
        except SoafarmError as e:
            hint = f" (session {session.id}: the batch is not sealed; resume with: {resume})"
            e.args = (f"{e}{hint}",)  # same class, so the same exit code
            raise
        except KeyboardInterrupt:
            say(
                "submit_interrupted",
                f"soafarm: interrupted; the batch is not sealed; resume with: {resume}",
                "warning",
                session_id=session.id,
                resume=resume,
            )
            raise
        finally:
            session.detach()
    if as_json:
        emit_json(
            {
                "session_id": session.id,
                "client_id": client_id,
                "requests": sent,
                "durable": session.durable,
            }
        )
    else:
        click.echo(session.id)


def _status_rows(status: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (
            c["client_id"],
            c["accepted"],
            c["done"],
            c["faulted"],
            c["outstanding"],
            "yes" if c["sealed"] else "no",
            "yes" if c["finished"] else "no",
        )
        for c in status["clients"]
    ]


@cli.command()
@with_settings
@click.argument("session_id", type=int)
@click.option("--follow", is_flag=True, help="Show live progress until every batch is done.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def attach(settings: Settings, session_id: int, follow: bool, as_json: bool) -> None:
    """Show a session's state and each client id's progress."""
    from soafarm.client.session import attach_session

    session = attach_session(session_id, settings)
    try:
        status = session.status()
        if follow:
            with LiveProgress("responses") as bar:
                while True:
                    for c in status["clients"]:
                        if c["client_id"] not in bar:
                            bar.add(c["client_id"], f"client {c['client_id']}")
                        # before the batch is sealed more may come: no ETA yet
                        bar.update(
                            c["client_id"],
                            completed=c["done"],
                            total=c["total"] if c["sealed"] else c["accepted"],
                            faults=c["faulted"],
                            open_ended=not c["sealed"],
                        )
                    clients = status["clients"]
                    if clients and all(c["finished"] for c in clients):
                        break
                    time.sleep(0.5)  # a progress display polls; 0.5 s is what a person sees
                    status = session.status()
    finally:
        session.detach()
    if as_json:
        emit_json(status)
        return
    kind = "durable" if status.get("durable") else "interactive"
    click.echo(
        f"session {status['id']}: {status['service']} ({kind}), state {status['state']}, "
        f"{len(status['instances'])} instance(s)"
    )
    emit_table(
        "Clients",
        ["client id", "accepted", "done", "faulted", "outstanding", "sealed", "finished"],
        _status_rows(status),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def response_record(response: Response) -> dict[str, Any]:
    """A response as one JSON-lines record; faults carry `fault` instead of `result`."""
    record: dict[str, Any] = {"id": response.id, "user_data": response.user_data}
    if response.fault is not None:
        record["fault"] = {
            "type": response.fault.type,
            "message": response.fault.message,
            "detail": response.fault.detail,
        }
    else:
        record["result"] = response.value
    return record


@cli.command()
@with_settings
@click.argument("session_id", type=int)
@click.option("--client-id", default="default", show_default=True)
@click.option("--follow", is_flag=True, help="Wait until the whole batch is answered.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of stdout.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("--new-only", is_flag=True, help="Only responses no reader has read yet.")
@click.option("--timeout", type=float, help="Give up after this many seconds without a response.")
@click.option(
    "--append",
    is_flag=True,
    help="Add to --output, skipping ids it already has (resuming an interrupted read).",
)
def responses(  # noqa: PLR0917 - click passes every option by name
    settings: Settings,
    session_id: int,
    client_id: str,
    follow: bool,
    output: Path | None,
    fmt: str,
    new_only: bool,
    timeout: float | None,
    append: bool,
) -> None:
    """Write a client id's responses, each exactly once, faults included and marked.

    It rides out a RabbitMQ or Redis restart (for up to `client.reconnect_timeout`); when it
    gives up, or on Ctrl-C, it prints the command that resumes the read.
    """
    from soafarm.client.broker_client import BrokerClient
    from soafarm.client.session import attach_session

    if append and output is None:
        raise ConfigError("--append adds to an --output FILE: give one")
    written = _ids_in(output, fmt) if append and output is not None else set()
    resume = _responses_resume(session_id, client_id, follow, output, fmt, timeout)
    session = attach_session(session_id, settings)
    count = faults = skipped = 0
    mode = "a" if append else "w"
    out: IO[str] = output.open(mode, encoding="utf-8", newline="") if output else sys.stdout
    try:
        writer = csv.writer(out) if fmt == "csv" else None
        if writer is not None and not (append and output is not None and output.stat().st_size):
            writer.writerow(["id", "user_data", "status", "result", "fault_type", "fault_message"])
        with (
            BrokerClient(session, client_id, create=False) as client,
            LiveProgress("responses") if follow else contextlib.nullcontext() as bar,
        ):
            shown = _ReadProgress(bar, client, new_only) if bar is not None else None
            # --new-only is exact even if this command is killed: each response is written
            # out, then committed as read when the next one is asked for
            responses = client.get_responses(
                timeout, new_only, available_only=not follow, commit_each=new_only
            )
            for response in responses:
                if response.id in written:
                    skipped += 1  # --append: the file has it from an interrupted read
                else:
                    count += 1
                    faults += response.is_fault
                    _write(out, writer, response)
                    if new_only:
                        out.flush()
                if shown is not None:
                    shown.seen(count + skipped, faults)
    except ConnectionFailed as e:  # gave up on a server: same class, so exit 3
        e.args = (f"{e}; {count} response(s) written; resume with: {resume}",)
        raise
    except KeyboardInterrupt:
        say(
            "responses_interrupted",
            f"soafarm: interrupted after {count} response(s); resume with: {resume}",
            "warning",
            written=count,
            resume=resume,
        )
        raise
    finally:
        session.detach()
        if output:
            out.close()
    say(
        "responses_written", f"{count} response(s), {faults} fault(s)", written=count, faults=faults
    )


class _ReadProgress:
    """`responses --follow`'s live progress: the responses this read has seen, of those it
    will see (the client id's batch, less what earlier reads took for good: everything they
    handed out with --new-only or from an interactive session, where a response is read
    once), with faults, responses/s and the time left at that rate."""

    #: Seconds between reads of the client id's counters while its batch is not sealed.
    POLL = 1.0

    def __init__(self, bar: LiveProgress, client: BrokerClient, new_only: bool) -> None:
        self.bar = bar
        self.client = client
        self.key = client.client_id
        from soafarm.client.reader import Bitmap

        self.before = 0
        # a durable read without --new-only reads the whole stream again
        if not client.durable or new_only:
            with contextlib.suppress(redis.RedisError, OSError):  # the figures can wait
                self.before = Bitmap(client.progress.read_bitmap()).count
        self.total: int | None = None
        self.sealed = False
        self.polled = 0.0
        bar.add(self.key, f"client {self.key}")
        self._poll()
        self.seen(0, 0)

    def _poll(self) -> None:
        # one try, not the client's retries through an outage: the read rides it out, and
        # the figures are read again at the next response
        self.polled = time.monotonic()
        try:
            progress = self.client.progress.load()
        except (redis.RedisError, OSError):
            return
        self.sealed = progress.sealed and progress.total is not None
        whole = progress.total if self.sealed and progress.total is not None else progress.accepted
        self.total = max(whole - self.before, 0)

    def seen(self, count: int, faults: int) -> None:
        """`count` responses seen so far, `faults` of them faults."""
        if not self.sealed and time.monotonic() - self.polled >= self.POLL:
            self._poll()
        self.bar.update(
            self.key, completed=count, total=self.total, faults=faults, open_ended=not self.sealed
        )


def _responses_resume(  # noqa: PLR0917 - the command's own options
    session_id: int,
    client_id: str,
    follow: bool,
    output: Path | None,
    fmt: str,
    timeout: float | None,
) -> str:
    """The command that goes on with an interrupted read: `--new-only` starts where the
    commits of this one stopped, and with a file `--append` skips any response it already
    has (exact even when Redis lost the last commits)."""
    command = f"soafarm responses {session_id} --client-id {client_id} --new-only"
    if follow:
        command += " --follow"
    if fmt != "jsonl":
        command += f" --format {fmt}"
    if timeout is not None:
        command += f" --timeout {timeout:g}"
    if output is not None:
        command += f" --output {output} --append"
    return command


def _cut_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate `path` after its last newline (a write cut short by a kill)."""
    with path.open("rb+") as raw:
        end = raw.seek(0, 2)
        at = end
        while at > 0:
            start = max(at - chunk, 0)
            raw.seek(start)
            data = raw.read(at - start)
            if at == end and data.endswith(b"\n"):
                return
            newline = data.rfind(b"\n")
            if newline >= 0:
                raw.truncate(start + newline + 1)
                return
            at = start
        raw.truncate(0)


def _ids_in(output: Path, fmt: str) -> set[int]:
    """The response ids an earlier read wrote to `output` (none if it does not exist). A
    last line a killed read left unfinished is cut off first: its response comes again."""
    if not output.is_file():
        return set()
    _cut_torn_line(output)
    ids: set[int] = set()
    with output.open(encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            for row in csv.reader(fh):
                if row and row[0].isdigit():  # not the header, not a torn last line
                    ids.add(int(row[0]))
            return ids
        for line in fh:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                ids.add(int(json.loads(line)["id"]))  # a torn last line is written again
    return ids


def _write(out: IO[str], writer: Any, response: Response) -> None:
    if writer is None:
        out.write(json.dumps(response_record(response), default=_jsonable) + "\n")
        return
    fault = response.fault
    writer.writerow(
        [
            response.id,
            json.dumps(response.user_data, default=_jsonable),
            "fault" if fault else "ok",
            "" if fault else json.dumps(response.value, default=_jsonable),
            fault.type if fault else "",
            fault.message if fault else "",
        ]
    )
