"""An app-like script for redis-py, run through the proxy by tests/tests/libraries.rs:
connect, a pipeline, a transaction, pub/sub, a blocking pop and SCAN. Usage:
app.py HOST PORT PREFIX [resp3|default]. Prints "ok" and exits 0 when every step gave what
Redis gives; a warning logged by redis-py (such as its RESP2 fallback) is a failure."""

import logging
import sys
import threading
import time

import redis

host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "default"
warnings = []


class Collect(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())


logging.getLogger().addHandler(Collect())
kwargs = {"protocol": 3} if mode == "resp3" else {}
r = redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=10, **kwargs)


def k(name):
    return f"{prefix}:{name}"


r.set(k("s"), "v")
assert r.get(k("s")) == "v"
assert r.get(k("missing")) is None
r.hset(k("h"), mapping={"f": "1", "g": "2"})
assert r.hgetall(k("h")) == {"f": "1", "g": "2"}
assert r.mget([k("s"), k("missing"), k("other")]) == ["v", None, None]
r.zadd(k("z"), {"m": 1.5})
assert r.zscore(k("z"), "m") == 1.5

pipe = r.pipeline(transaction=False)
pipe.set(k("a"), "1").incr(k("a")).get(k("a"))
assert pipe.execute() == [True, 2, "2"]
tag = "{" + prefix + "}"
txn = r.pipeline(transaction=True)
txn.incr(tag + "c").incr(tag + "c").hset(tag + "h", "x", "1")
assert txn.execute() == [1, 2, 1]

p = r.pubsub()
p.subscribe(k("ch"))
assert p.get_message(timeout=5)["type"] == "subscribe"
assert r.publish(k("ch"), "hi") == 1
message = None
deadline = time.time() + 5
while message is None and time.time() < deadline:
    message = p.get_message(timeout=1, ignore_subscribe_messages=True)
assert message and message["data"] == "hi", message
p.unsubscribe(k("ch"))
p.close()

blocker = redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=10, **kwargs)
threading.Timer(0.2, lambda: r.lpush(k("q"), "x")).start()
assert list(blocker.blpop([k("q")], timeout=5)) == [k("q"), "x"]
blocker.close()

for i in range(20):
    r.set(k(f"scan:{i}"), i)
assert len(set(r.scan_iter(match=k("scan:*"), count=5))) == 20

hello = r.execute_command("HELLO")
if mode == "resp3":
    assert hello["proto"] == 3, hello
assert not warnings, warnings
r.close()
print("ok")
