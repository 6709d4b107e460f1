"""Running a batch carefully: the retry policy of `message_resend_limit`.

A batch RabbitMQ delivers again (`redelivered`: an instance crashed, timed out or lost its
host while holding it), and every batch of an at-most-once session (message_resend_limit 0),
is run carefully: requests that already have a response are skipped, each remaining one
counts an attempt in Redis first, and its response is published before the next one starts.
So the request that kills its instance is the one whose attempts grow, and after
`message_resend_limit` retries it is answered with a RetryLimitExceeded fault instead of
being run again, while the innocent requests of its batch run normally. The fast path (a
first delivery) costs nothing of this.
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog

from soafarm.protocol import Request, RequestBatch
from soafarm.service import CallRunner, Outcome
from soafarm.workers.call_stats import CallStats
from soafarm.workers.done import Counts

log = structlog.get_logger(__name__)


class Retries:
    """Decides, request by request, what a carefully-run batch does."""

    def __init__(
        self,
        counts: Counts,
        runner: CallRunner,
        instance_id: str,
        stats: CallStats | None = None,
    ) -> None:
        """`runner.resend_limit` is the session's message_resend_limit; `stats` (if given)
        counts the retries for the host's metrics."""
        self.counts = counts
        self.runner = runner
        self.instance_id = instance_id
        self.stats = stats

    def careful(self, batch: RequestBatch, redelivered: bool) -> bool:
        """True when `batch` must be run carefully rather than on the fast path."""
        # at-most-once counts every start, so a redelivery knows what ran
        return redelivered or self.runner.resend_limit == 0

    def plan(self, batch: RequestBatch) -> Iterator[tuple[Request, Outcome | None]]:
        """Each request still to answer, with its fault if it is past the retry limit (None:
        run it). Attempts are counted as the iterator advances, just before each run."""
        sid, cid = batch.session_id, batch.client_id
        answered = self.counts.answered(sid, cid, [r.id for r in batch.requests])
        log.info(
            "batch_redelivered",
            instance=self.instance_id,
            requests=len(batch.requests),
            answered=len(answered),
        )
        limit = self.runner.resend_limit
        for request in batch.requests:
            if request.id in answered:
                continue
            counted = self.counts.count_attempt(sid, cid, request.id)
            # with a limit, the first run (fast path) is not counted; at-most-once counts it
            retry = counted - 1 if limit == 0 else counted
            if retry > 0 and self.stats is not None:
                self.stats.retries += 1
            if retry > limit:
                yield (
                    request,
                    self.runner.retry_limit_fault(
                        request, retry - 1, "its instance crashed, timed out or lost its host"
                    ),
                )
            else:
                yield request, None
