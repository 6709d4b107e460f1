"""Logging set-up for entry points (CLI commands, daemons); library modules only get loggers.

Two formats (setting `log_format`, `SOAFARM_LOG_FORMAT`, `--log-format`): `console`, key=value
lines for a person, and `json`, where stderr carries nothing but JSON objects, one a line:
structlog events, the records of libraries that log through the standard `logging` module
(pika's connection errors, kombu's warnings, Python warnings), exceptions nothing caught,
the CLI's banners (`say`) and its error line (`report_error`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from types import TracebackType
from typing import Any

import structlog

#: The log formats `log_format` accepts.
LOG_FORMATS = ("console", "json")
#: Marks the handler `configure_logging` puts on the root logger, so a second call (the demo
#: lowers its level) replaces it instead of adding another.
_HANDLER_MARK = "_soafarm_handler"

#: The format of the last `configure_logging` call (None: not called in this process).
_configured: str | None = None
#: A format asked for before settings were loaded (`soafarm --log-format json ...`).
_hint: str | None = None


def configure_logging(log_format: str = "console", level: str = "info") -> None:
    """Send structlog events to stderr: key=value for a terminal, or one JSON object a line.

    With `json`, records of the standard `logging` module (libraries such as pika) and
    Python warnings are rendered as JSON lines too, from WARNING up (or `level` if higher):
    their INFO and DEBUG chatter is not the operator's. With `console` they are left to
    Python's defaults, as before (pika's are silent: it installs a NullHandler).
    """
    global _configured  # noqa: PLW0603 - the process's logging set-up is process-wide
    _configured = log_format
    number = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(log_format, max(number, logging.WARNING), shared)


def _route_stdlib(log_format: str, level: int, shared: list[structlog.types.Processor]) -> None:
    """Render the standard library's log records through structlog in JSON mode."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    if log_format != "json":
        logging.captureWarnings(False)
        # back to Python's own, unless someone else (a test runner) put theirs in meanwhile
        if sys.excepthook is _log_uncaught:
            sys.excepthook = sys.__excepthook__
        if threading.excepthook is _log_uncaught_in_thread:
            threading.excepthook = threading.__excepthook__
        return
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    # `warnings.warn` writes plain text to stderr; as records they become JSON lines
    logging.captureWarnings(True)
    # and an exception nothing caught (a process's or a thread's) is an event, not a traceback
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    """sys.excepthook in JSON mode: the exception as a `critical` event with its traceback."""
    structlog.get_logger("soafarm").critical("uncaught_exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook in JSON mode (SystemExit in a thread is silent, as by default)."""
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("soafarm").critical(
        "uncaught_exception",
        thread=None if args.thread is None else args.thread.name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def prefer_format(log_format: str | None) -> None:
    """Remember a format given before the settings are loaded (`soafarm --log-format json
    CMD`), for what is printed before `configure_logging` runs (an error loading them)."""
    global _hint  # noqa: PLW0603 - process-wide, as the logging set-up
    if log_format in LOG_FORMATS:
        _hint = log_format


def current_format() -> str:
    """The log format in force: the configured one, else the one given on the command line,
    else `SOAFARM_LOG_FORMAT`, else console."""
    if _configured is not None:
        return _configured
    if _hint is not None:
        return _hint
    env = os.environ.get("SOAFARM_LOG_FORMAT", "").strip().lower()
    return env if env in LOG_FORMATS else "console"


_STAMP = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _json_line(level: str, event: str, **fields: Any) -> None:
    """One JSON log line written directly: for lines that must show whatever the level is
    (errors), or before structlog is configured."""
    line = _STAMP(None, "", {"event": event, **fields, "level": level})
    sys.stderr.write(json.dumps(line, default=str) + "\n")
    sys.stderr.flush()


def say(event: str, text: str, level: str = "info", **fields: Any) -> None:
    """Tell the operator something on stderr (a banner, a progress line, a summary): `text`
    as is on a console, or, in JSON mode, a log event `event` with `message=text` and
    `fields` (subject to the log level, as every event)."""
    if current_format() != "json":
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        return
    if _configured is None:
        _json_line(level, event, message=text, **fields)
        return
    logger = structlog.get_logger("soafarm.cli")
    logger.log(logging.getLevelNamesMapping()[level.upper()], event, message=text, **fields)


def report_error(message: str, exit_code: int) -> None:
    """The CLI's error line: `soafarm: error: MESSAGE`, or in JSON mode an `error` event
    (always shown, whatever the log level)."""
    if current_format() == "json":
        _json_line("error", "error", error=message, exit_code=exit_code)
    else:
        sys.stderr.write(f"soafarm: error: {message}\n")
        sys.stderr.flush()
