"""Unit tests of the operating parts: health, progress line, metrics, oplog arithmetic."""

from __future__ import annotations

import logging

from bson import Timestamp
from prometheus_client import generate_latest

from mongo_outbox._oplog import OplogWindow, headroom, token_time
from mongo_outbox.relay._health import Health
from mongo_outbox.relay._metrics import RelayMetrics
from mongo_outbox.relay._progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_health_is_ok_while_the_loop_beats_and_fails_when_it_stops():
    clock = Clock()
    health = Health(unhealthy_after=10, clock=clock)
    assert health.live() == (True, "ok")
    clock.now += 9
    health.beat()
    clock.now += 9
    assert health.live()[0]
    clock.now += 2
    ok, reason = health.live()
    assert not ok
    assert "no progress for 11s" in reason
    health.beat()
    assert health.live()[0]


def test_health_fails_when_the_pipeline_keeps_failing_even_while_beating():
    clock = Clock()
    health = Health(unhealthy_after=10, clock=clock)
    health.pipeline_failed("connection refused")
    clock.now += 5
    health.beat()  # a standby poll or a restart's sweep batch does not end the failures
    health.pipeline_failed("connection refused again")
    clock.now += 6
    health.beat()
    ok, reason = health.live()
    assert not ok
    assert reason == "no progress for 11s, pipeline failing: connection refused again"
    health.working()  # steady state again
    assert health.live() == (True, "ok")


def test_healthz_counts_from_the_last_progress_not_from_the_first_failure():
    """One rule: no progress for unhealthy_after. A MongoDB that freezes 40 s before the
    pipeline notices (server selection timeout) fails the probe 60 s after the last progress,
    not 60 s after the failure, however often the failing polls come round."""
    clock = Clock()
    health = Health(unhealthy_after=60, clock=clock)
    health.beat()  # the last batch before MongoDB froze
    clock.now += 40
    health.pipeline_failed("ServerSelectionTimeoutError")
    for _ in range(21):
        clock.now += 1
        health.beat()  # restart attempts that read something, polls: none counts
    ok, reason = health.live()
    assert not ok, reason
    assert reason.startswith("no progress for 61s, pipeline failing")


def test_readyz_is_active_only_while_the_lease_renewal_is_fresh():
    age: list[float | None] = [0.5]
    health = Health(unhealthy_after=60, clock=Clock())
    health.watch_lease(lambda: age[0], fresh_for=7.5)
    health.readiness(None)
    health.role("active")
    assert health.ready() == (True, "active")
    age[0] = 7.6  # a renewal missed by one interval (renewals every 3.75 s)
    ok, reason = health.ready()
    assert not ok
    assert "lease last renewed 7.6s ago" in reason
    age[0] = None  # the lease is gone; the loop has not noticed yet
    assert health.ready() == (False, "lease lost (not yet back to standby)")
    health.role("standby")
    assert health.ready() == (True, "standby")


def test_health_stopped_and_readiness():
    health = Health(unhealthy_after=10, clock=Clock())
    assert health.ready() == (False, "not connected to MongoDB yet")
    health.readiness(None)
    assert health.ready() == (False, "starting")
    health.role("standby")
    assert health.ready() == (True, "standby")
    health.role("active")
    assert health.ready() == (True, "active")
    health.readiness("no outbox collection d.outbox")
    assert health.ready() == (False, "no outbox collection d.outbox")
    health.stopped("ValueError: boom")
    assert health.live() == (False, "relay loop stopped: ValueError: boom")


def test_progress_line_at_most_every_interval_and_quiet_when_idle(caplog):
    caplog.set_level(logging.INFO, logger="mongo_outbox.relay")
    clock = Clock()
    progress = Progress(interval=10, clock=clock)
    assert progress.update(100, 0.5, 3) is None  # too soon
    clock.now += 10
    line = progress.update(200, 0.25, 7)
    assert line == "published 200 events in 10s (20/s), lag 0.25s, pending 7"
    assert line in caplog.text
    clock.now += 5
    assert progress.update(300, None, None) is None
    clock.now += 5
    assert (
        progress.update(300, None, None) == "published 100 events in 10s (10/s), lag -, pending -"
    )
    clock.now += 30
    assert progress.update(300, None, None) is None  # idle: nothing published since


def test_metrics_carry_the_outbox_and_relay_labels_and_drop_an_unknown_oplog():
    metrics = RelayMetrics("shop.outbox", "main")
    metrics.published(["a", "a", "b"])
    metrics.failed(["a"], "transient")
    metrics.oplog(3600.0, 1200.0)
    text = generate_latest(metrics.registry).decode()
    assert (
        'mongo_outbox_events_published_total{outbox="shop.outbox",relay="main",topic="a"} 2.0'
        in text
    )
    assert 'kind="transient"' in text
    assert 'mongo_outbox_oplog_window_seconds{outbox="shop.outbox",relay="main"} 3600.0' in text
    metrics.oplog(None, None)
    text = generate_latest(metrics.registry).decode()
    assert "mongo_outbox_oplog_window_seconds{" not in text
    assert "mongo_outbox_oplog_headroom_seconds{" not in text


def test_token_time_reads_the_cluster_time_of_a_resume_token():
    token = {"_data": "826B09E796000000142B022C0100296E5A1004"}
    assert token_time(token) == Timestamp(0x6B09E796, 0x14)
    assert token_time({"_data": "not hex at all, no"}) is None
    assert token_time({"_data": "01" * 20}) is None  # not a timestamp-first token
    assert token_time({}) is None
    assert token_time(None) is None


def test_headroom_is_the_token_time_minus_the_oldest_entry():
    window = OplogWindow(Timestamp(1000, 1), Timestamp(5000, 1))
    assert window.seconds == 4000
    assert headroom({"_data": "82" + f"{1900:08X}" + "00000001" + "00"}, window) == 900
    assert headroom(None, window) is None
    assert (
        headroom({"_data": "82" + f"{1900:08X}" + "00000001"}, OplogWindow(unavailable="x")) is None
    )


def test_a_topic_named_by_path_or_by_id_is_one_series():
    metrics = RelayMetrics("shop.outbox", "main")
    metrics.published(["projects/p/topics/orders", "orders", None])
    text = generate_latest(metrics.registry).decode()
    assert 'relay="main",topic="orders"} 2.0' in text
    assert 'topic=""} 1.0' in text
    assert "projects/p/topics" not in text


def test_a_malformed_tracestate_is_not_published():
    import datetime as dt

    from bson import ObjectId

    from mongo_outbox._message import message_from_document

    parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    doc = {
        "_id": ObjectId(),
        "type": "T",
        "payload": b"x",
        "created_at": dt.datetime.now(dt.timezone.utc),
        "trace": {"traceparent": parent, "tracestate": "!!!bad"},
    }
    attributes = message_from_document(doc, "t").attributes
    assert attributes["googclient_traceparent"] == parent
    assert "googclient_tracestate" not in attributes
    doc["trace"]["tracestate"] = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert message_from_document(doc, "t").attributes["googclient_tracestate"].startswith("rojo")


def test_the_batch_histogram_counts_like_a_prometheus_histogram():
    from prometheus_client import CollectorRegistry, Histogram

    from mongo_outbox.relay._metrics import BatchHistogram

    values = [0.0, 0.01, 0.0100001, 0.5, 2.0, 2.5, 7.0, 1e9]
    buckets = (0.01, 0.5, 2.5, 10)
    reference = CollectorRegistry()
    histogram = Histogram("ref", "r", ["outbox"], buckets=buckets, registry=reference)
    for value in values:
        histogram.labels(outbox="o").observe(value)
    ours = CollectorRegistry()
    batch = BatchHistogram("ref", "r", {"outbox": "o"}, buckets)
    ours.register(batch)
    batch.observe_many(values[:3])
    batch.observe_many(values[3:])

    def samples(registry):
        return sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        )

    assert samples(ours) == samples(reference)
