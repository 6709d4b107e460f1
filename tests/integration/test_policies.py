"""Broker policies against the real servers: retries, timeouts, loading, settings levels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import SessionFailed, Throttled
from soafarm.local.farm import LocalFarm
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def executions(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_one(settings: Settings, op: str, *args: object, **broker: object) -> tuple[dict, ...]:  # type: ignore[type-arg]
    """Send `op` in the middle of 40 `ok` requests; return (faulted response info, session)."""
    info = SessionStartInfo("faulty", broker_settings=broker)
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        for i in range(40):
            if i == 20:
                client.send_request(op, *args, user_data="target")
            else:
                client.send_request("ok", i, user_data=i)
        client.end_requests()
        responses = {r.user_data: r for r in client.get_responses(timeout=60)}
        record = session.status()
    assert len(responses) == 40
    assert all(responses[i].result == i for i in range(40) if i != 20)  # the batch went on
    target = responses["target"]
    fault = target.fault
    return ({"fault": fault, "value": target.value}, record)


def test_a_crashing_request_is_retried_up_to_the_limit_then_faulted(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    log = tmp_path / "crash.log"
    outcome, record = run_one(settings, "crash_logged", str(log))
    assert record["broker_settings"]["message_resend_limit"] == 3  # the default
    fault = outcome["fault"]
    assert fault is not None and fault.type == "RetryLimitExceeded"
    assert fault.retries == 3 and "after 3 retries" in fault.message
    assert executions(log) == 4  # the first run and 3 retries, never more


def test_resend_limit_zero_is_at_most_once(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    log = tmp_path / "crash.log"
    outcome, _ = run_one(settings, "crash_logged", str(log), message_resend_limit=0)
    assert outcome["fault"].type == "RetryLimitExceeded" and outcome["fault"].retries == 0
    assert executions(log) == 1


def test_retry_operation_error_reruns_the_call(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    ok, _ = run_one(settings, "retry_logged", str(tmp_path / "a.log"), 3)
    assert ok["fault"] is None and ok["value"] == 3
    failed, _ = run_one(
        settings, "retry_logged", str(tmp_path / "b.log"), 99, message_resend_limit=2
    )
    assert failed["fault"].type == "RetryLimitExceeded" and failed["fault"].retries == 2
    assert "the service asked" in failed["fault"].message
    assert executions(tmp_path / "b.log") == 3


def test_service_operation_timeout_ends_the_call_and_counts_as_a_retry(
    settings: Settings, farm: LocalFarm, tmp_path: Path
) -> None:
    log = tmp_path / "slow.log"
    outcome, _ = run_one(
        settings, "sleep_logged", str(log), 60, service_operation_timeout=1, message_resend_limit=1
    )
    assert outcome["fault"].type == "RetryLimitExceeded" and outcome["fault"].retries == 1
    assert executions(log) == 2


def test_a_call_longer_than_two_heartbeats_keeps_its_connection(
    settings: Settings, tmp_path: Path
) -> None:
    """A call thread's connection is tended by the instance's main thread while a call runs:
    with 2 s heartbeats, RabbitMQ would close an untended connection after about 4 s and
    redeliver the batch, so the call would run again."""
    beating = settings.replace(amqp_url=settings.amqp_url + "?heartbeat=2")
    log = tmp_path / "long.log"
    with (
        LocalFarm(beating, workers=1, cores=1),
        Session.create(SessionStartInfo("faulty"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("sleep_logged", str(log), 6)
        responses = list(client.get_responses(timeout=60))
    assert [r.result for r in responses] == [6]
    assert executions(log) == 1


def test_service_init_timeout_fails_the_session(settings: Settings, farm: LocalFarm) -> None:
    folder = settings.service_registration_path[0]
    faulty = Path(__file__).resolve().parents[2] / "examples"
    (folder / "slowstart.toml").write_text(
        f'entry_point = "faulty:FaultyService"\npython_path = ["{faulty}"]\n'
        'service_init_timeout = 1\n[environment]\nFAULTY_INIT_SECONDS = "30"\n'
        "[broker]\nend_point_not_found_retry_period = 1\n"
    )
    with (
        Session.create(SessionStartInfo("slowstart"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("ok", 1)
        with pytest.raises(SessionFailed, match=r"did not load within service_init_timeout \(1s\)"):
            list(client.get_responses(timeout=60))


def test_broker_settings_levels(settings: Settings, tmp_path: Path) -> None:
    """defaults < broker config < registration [broker] < SessionStartInfo.broker_settings"""
    folder = settings.service_registration_path[0]
    (folder / "tuned.toml").write_text(
        'entry_point = "echo:EchoService"\npython_path = ["'
        + str(Path(__file__).resolve().parents[2] / "examples")
        + '"]\n[broker]\nclient_idle_timeout = 77\nmessage_resend_limit = 1\n'
    )
    broker_config = dataclasses.replace(
        settings.broker, message_resend_limit=5, session_idle_timeout=9, client_idle_timeout=66
    )
    with LocalFarm(settings.replace(broker=broker_config), workers=1, cores=1):
        with Session.create(SessionStartInfo("echo"), settings) as plain:
            levels = plain.status()["broker_settings"]
            assert levels["message_resend_limit"] == 5  # broker config over the default
            assert levels["allocation_grow_load_ratio_threshold"] == 125  # default
        info = SessionStartInfo("tuned", broker_settings={"message_resend_limit": 0})
        with Session.create(info, settings) as tuned:
            levels = tuned.status()["broker_settings"]
            assert levels["session_idle_timeout"] == 9  # broker config
            assert levels["client_idle_timeout"] == 77  # registration over broker config
            assert levels["message_resend_limit"] == 0  # session over registration


def test_throttling_bounds_outstanding_requests(settings: Settings, farm: LocalFarm) -> None:
    s = settings.replace(client=dataclasses.replace(settings.client, request_batch_size=10))
    thresholds = {"message_throttle_start_threshold": 200, "message_throttle_stop_threshold": 100}
    info = SessionStartInfo("faulty", broker_settings=thresholds)
    peak = 0
    with Session.create(info, s) as session, BrokerClient(session) as client:
        for i in range(2000):  # 2 ms each on 2 instances: sending is far faster than serving
            client.send_request("sleep", 0.002, user_data=i)
            if i % 10 == 9:
                client.flush()  # nothing buffered: `sent` is what RabbitMQ has
                peak = max(peak, client.sent - client.status().done)
        client.end_requests()
        assert sorted(r.user_data for r in client.get_responses(timeout=60)) == list(range(2000))
    assert 150 <= peak <= 200 + 10, peak  # it filled up to the threshold, and no further


def test_throttled_send_gives_up_after_the_throttle_timeout(
    settings: Settings, farm: LocalFarm
) -> None:
    s = settings.replace(
        client=dataclasses.replace(settings.client, request_batch_size=1, throttle_timeout=0.5)
    )
    thresholds = {"message_throttle_start_threshold": 3, "message_throttle_stop_threshold": 2}
    with Session.create(SessionStartInfo("faulty", broker_settings=thresholds), s) as session:
        client = BrokerClient(session)
        with pytest.raises(Throttled, match=r"3 outstanding requests after 0\.\d+s"):
            for _ in range(10):
                client.send_request("sleep", 1.5)
        assert client.sent == 4  # three went out; the fourth waited and stays buffered
        client.close(discard=True)


def test_a_large_batch_keeps_client_memory_and_queue_depth_bounded(
    settings: Settings, farm: LocalFarm
) -> None:
    import resource
    import threading

    import pika

    from soafarm.names import Names

    n, batch = 200_000, settings.client.request_batch_size
    peak_depth = peak_outstanding = 0
    stop = threading.Event()
    with Session.create(SessionStartInfo("echo"), settings) as session:
        queue = Names(settings.namespace).request_queue(session.id)
        client = BrokerClient(session)

        def sample() -> None:
            nonlocal peak_depth, peak_outstanding
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            channel = conn.channel()
            while not stop.wait(0.02):  # sampling the queue, not synchronising on it
                depth = channel.queue_declare(queue, passive=True).method.message_count
                peak_depth = max(peak_depth, depth)
                # requests sent (buffered ones too) and not answered: what RabbitMQ can hold
                peak_outstanding = max(peak_outstanding, client.sent - client.status().done)
            conn.close()

        sampler = threading.Thread(target=sample)
        sampler.start()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            with client:
                for i in range(n):
                    client.send_request("echo", "x", user_data=i)
                client.end_requests()
                count = sum(1 for _ in client.get_responses(timeout=60))
        finally:
            stop.set()
            sampler.join()
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert count == n
    # the default start threshold, and a batch in the client's buffer: the queue holds no more
    # requests than that (its messages are batches of up to 100, fewer when the sender paused)
    assert peak_outstanding <= 5120 + 2 * batch, peak_outstanding
    assert peak_depth <= peak_outstanding, (peak_depth, peak_outstanding)
    assert grown_mib < 40, grown_mib


def test_a_lost_host_is_forgotten_and_its_instances_leave(settings: Settings) -> None:
    import signal

    from soafarm.client.control import ControlClient

    farm = LocalFarm(settings, workers=1, cores=1)
    farm.start()
    try:
        with Session.create(SessionStartInfo("echo"), settings) as session:
            (instance,) = [i["pid"] for i in _instances(session, 1)]
            host = next(p for what, p in farm.procs if what.startswith("worker"))
            host.send_signal(signal.SIGKILL)  # the host agent dies; its instance is orphaned
            host.wait()
            control = ControlClient(settings)
            try:
                wait_until("the host to be declared lost", lambda: control.call("hosts") == [], 30)
            finally:
                control.close()
            wait_until("the orphaned instance to leave", lambda: not _alive(instance), 30)
    finally:
        farm.stop()


def _instances(session: Session, count: int) -> list[dict]:  # type: ignore[type-arg]
    session.wait_for_instances(count)
    return list(session.status()["instances"])


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_slow_batch_is_shared_by_idle_instances(settings: Settings, farm: LocalFarm) -> None:
    with Session.create(SessionStartInfo("faulty", min_units=2), settings) as session:
        session.wait_for_instances(2)
        with BrokerClient(session) as client:
            for i in range(40):  # one batch: 40 x 50 ms
                client.send_request("sleep_whoami", 0.05, user_data=i)
            client.end_requests()
            responses = list(client.get_responses(timeout=60))
    assert sorted(r.user_data for r in responses) == list(range(40))
    assert len({r.result for r in responses}) == 2  # the second instance took part of it
