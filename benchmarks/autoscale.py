"""Issue 5's figures: how fast the farm grows for a burst, how busy it keeps its instances
while a backlog exists, and how fast it drains and scales to zero.

    python -m benchmarks.autoscale [--requests 2000] [--seconds 0.05] [--max-hosts 4]

Starts a broker and the autoscaler with one local pool (single-core hosts, 0..max-hosts) and
short intervals (sampling 0.2 s, adjusting every second, idle after 3 s), then sends one burst
of sleeping requests to a session that starts with zero hosts, and prints:

- burst -> first response: the first host started, its instance loaded and answered;
- burst -> first added host serving: the first response from a second host;
- utilisation: busy call-seconds over capacity-seconds of the instances, sampled each second
  from the hosts' heartbeats while a backlog exists, that is while request batches wait in
  the queue (a host counts once one of its instances has served and reported twice);
- last response -> zero hosts, and that minus the idle timeout (the drain itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.broker.store import BrokerStore
from soafarm.config import AutoscalerSettings, PoolSettings, Settings, load_settings
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.names import Names
from soafarm.transport.connections import pika_connection, redis_client

IDLE_TIMEOUT = 3.0


@dataclass
class Burst:
    """What one burst measured (seconds from the first send unless said otherwise)."""

    responses: int = 0
    first: float = 0.0
    first_added: float = 0.0
    last: float = 0.0
    to_zero: float = 0.0  # from the last response
    most_hosts: int = 0
    utilisation: list[float] = field(default_factory=list)


class Sampler(threading.Thread):
    """Samples the hosts each second until `finish()`."""

    def __init__(self, settings: Settings, session_id: int, burst: Burst) -> None:
        """Call `start()`, then `finish()` after the last response."""
        super().__init__(daemon=True)
        self.settings, self.burst, self.done = settings, burst, threading.Event()
        self.store = BrokerStore(redis_client(settings), Names(settings.namespace))
        self.queue = Names(settings.namespace).request_queue(session_id)

    def run(self) -> None:
        """Record the host count, and each settled host's utilisation while batches wait."""
        connection = pika_connection(self.settings, "bench-autoscale-sampler")
        channel = connection.channel()
        while not self.done.wait(1.0):
            hosts = self.store.hosts()
            self.burst.most_hosts = max(self.burst.most_hosts, len(hosts))
            waiting = channel.queue_declare(self.queue, passive=True).method.message_count
            if waiting == 0:
                continue
            self.burst.utilisation.extend(
                h.utilisation
                for h in hosts.values()
                if h.utilisation is not None and not h.draining
            )
        connection.close()

    def finish(self) -> None:
        """Stop sampling."""
        self.done.set()
        self.join()


def run_burst(settings: Settings, requests: int, seconds: float, max_hosts: int) -> Burst:
    """Send the burst to a farm with zero hosts and the autoscaler; measure."""
    store = BrokerStore(redis_client(settings), Names(settings.namespace))
    burst = Burst()
    with LocalFarm(settings, workers=0, autoscale=True):
        info = SessionStartInfo("faulty", min_units=1, max_units=max_hosts)
        with Session.create(info, settings) as session, BrokerClient(session) as client:
            began = time.perf_counter()
            for i in range(requests):
                client.send_request("sleep_whoami", seconds, user_data=i)
            client.end_requests()
            sampler = Sampler(settings, session.id, burst)
            sampler.start()
            hosts_seen: list[str] = []
            for response in client.get_responses(timeout=600):
                burst.last = time.perf_counter() - began
                host = str(response.result).rsplit(".", 2)[0]
                if host not in hosts_seen:
                    hosts_seen.append(host)
                    if len(hosts_seen) == 1:
                        burst.first = burst.last
                    elif len(hosts_seen) == 2:  # the first added host
                        burst.first_added = burst.last
                burst.responses += 1
            sampler.finish()
            ended = time.perf_counter()
            while store.hosts():
                time.sleep(0.05)
            burst.to_zero = time.perf_counter() - ended
    return burst


def report(burst: Burst, seconds: float, max_hosts: int) -> str:
    """The figures as text."""
    ideal = burst.responses * seconds / max_hosts
    util = burst.utilisation or [0.0]
    lines = [
        f"burst of {burst.responses:,} requests of {seconds * 1000:.0f} ms, 0..{max_hosts} hosts",
        f"burst -> first response (first host, from zero)  {burst.first:6.2f} s",
        f"burst -> first added host serving                {burst.first_added:6.2f} s",
        f"burst -> last response                           {burst.last:6.2f} s"
        f" (all {max_hosts} hosts from t=0: {ideal:.1f} s)",
        f"most hosts at once                               {burst.most_hosts:6d}",
        f"instance utilisation while a backlog exists      {100 * statistics.mean(util):6.1f} %"
        f" (median {100 * statistics.median(util):.1f} %, {len(burst.utilisation)} samples)",
        f"last response -> zero hosts                      {burst.to_zero:6.2f} s"
        f" (idle timeout {IDLE_TIMEOUT:g} s"
        f" + adjust and drain {burst.to_zero - IDLE_TIMEOUT:.2f} s)",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run the burst and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.05, help="length of each call")
    parser.add_argument("--max-hosts", type=int, default=4)
    args = parser.parse_args()
    base = load_settings()
    settings = base.replace(
        namespace=f"bench-scale-{os.getpid()}",
        log_level="warning",
        broker=dataclasses.replace(
            base.broker, load_sampling_interval=0.2, allocation_adjust_interval=1.0
        ),
        autoscaler=AutoscalerSettings(
            idle_timeout=IDLE_TIMEOUT,
            pools=(PoolSettings(name="local", max_hosts=args.max_hosts, cores_per_host=1),),
        ),
    )
    try:
        burst = run_burst(settings, args.requests, args.seconds, args.max_hosts)
    finally:
        delete_namespace(settings)
    print(report(burst, args.seconds, args.max_hosts))


if __name__ == "__main__":
    main()
