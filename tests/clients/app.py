"""An app-like script for redis-py, run through the proxy by tests/tests/libraries.rs:
connect, a pipeline, a transaction, pub/sub, a blocking pop, SCAN, and in `cache` mode
client-side caching (cached reads, invalidated by another connection's write). Usage:
app.py HOST PORT PREFIX [resp3|default|cache]. Prints "ok" and exits 0 when every step gave
what Redis gives; a warning logged by redis-py (such as its RESP2 fallback) is a failure."""

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
kwargs = {"protocol": 3} if mode in ("resp3", "cache") else {}
if mode == "cache":
    import redis.connection
    from redis.cache import CacheConfig

    # redis-py turns caching on only for a server that calls itself "redis" 7.4 or later,
    # and none here does (Redis 7.0; Valkey 8.1 says "valkey", or "redis" 7.2.4 in its
    # compatibility mode). CLIENT TRACKING itself is Redis 6.0's, so the gate is moved to the
    # server behind; everything else is redis-py's own caching code.
    probe = redis.Redis(host=host, port=port, protocol=3, decode_responses=True)
    hello = probe.execute_command("HELLO")
    probe.close()
    redis.connection.CacheProxyConnection.DEFAULT_SERVER_NAME = hello["server"]
    redis.connection.CacheProxyConnection.MIN_ALLOWED_VERSION = hello["version"]
    kwargs["cache_config"] = CacheConfig()
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

# redis-py's pub/sub can't use a cached client's connections (its own bug: AttributeError
# 'health_check_interval', against Redis directly too), so a cached app subscribes with a
# client of its own.
subscriber = redis.Redis(host=host, port=port, decode_responses=True, protocol=3) if mode == "cache" else r
p = subscriber.pubsub()
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

if mode == "cache":
    # Cached reads: the second GET is served from the cache; a write from another
    # connection invalidates it, and the next reads see the new value, never the old one
    # once the invalidation is in.
    other = redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=10)
    other.set(k("cached"), "1")
    assert r.get(k("cached")) == "1"
    assert r.get(k("cached")) == "1"
    assert r.hgetall(k("h")) == {"f": "1", "g": "2"}
    cache = r.get_cache()
    assert cache is not None and cache.size >= 2, cache and cache.size
    other.set(k("cached"), "2")
    other.hset(k("h"), "f", "9")
    deadline = time.time() + 5
    while r.get(k("cached")) != "2" and time.time() < deadline:
        time.sleep(0.01)
    assert r.get(k("cached")) == "2"
    deadline = time.time() + 5
    while r.hgetall(k("h"))["f"] != "9" and time.time() < deadline:
        time.sleep(0.01)
    assert r.hgetall(k("h")) == {"f": "9", "g": "2"}
    other.close()

hello = r.execute_command("HELLO")
if mode in ("resp3", "cache"):
    assert hello["proto"] == 3, hello
assert not warnings, warnings
r.close()
print("ok")
