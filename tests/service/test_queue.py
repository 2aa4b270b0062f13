from __future__ import annotations

import json

import pytest

from service import queue
from service.errors import BrokerUnavailable
from service.settings import Settings


def test_enqueue_on_the_filesystem_broker_writes_a_message(tmp_path):
    s = Settings(home=tmp_path)
    queue.broker_ping(s)
    queue.enqueue_job("01job", "cpu", s)
    [msg] = list((tmp_path / "broker/queue").iterdir())
    body = json.loads(msg.read_text())
    assert body["headers"]["task"] == "slimline.run_job" and body["headers"]["id"] == "01job"
    assert body["properties"]["delivery_info"]["routing_key"] == "cpu"


def test_unreachable_broker_raises_broker_unavailable(tmp_path):
    s = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable):
        queue.enqueue_job("01job", "cpu", s)
    with pytest.raises(Exception):  # noqa: B017 - any connection error is a failed ping
        queue.broker_ping(s, timeout=1)


def test_each_queue_is_routed_to_its_own_redis_list(tmp_path):
    """With Redis, a job sent to `gpu` must land on the `gpu` list only (not on `cpu`)."""
    import redis

    url = "redis://127.0.0.1:6379/15"
    r = redis.Redis.from_url(url)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379 (make test starts it)")
    r.flushdb()
    settings = Settings(home=tmp_path, broker_url=url)
    try:
        queue.enqueue_job("job-gpu", "gpu", settings)
        queue.enqueue_job("job-cpu-1", "cpu", settings)
        queue.enqueue_job("job-cpu-2", "cpu", settings)
        assert r.llen("gpu") == 1 and r.llen("cpu") == 2
    finally:
        r.flushdb()
