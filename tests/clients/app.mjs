// An app-like script for node-redis with its default options (RESP3 since node-redis 6), run
// through the proxy by tests/tests/libraries.rs: connect, a pipeline, a transaction, pub/sub,
// a blocking pop, SCAN, and client-side caching (its `clientSideCache`: cached reads,
// invalidated by another connection's write). Prints "ok" and exits 0 when every step gave
// what Redis gives.
import { createClient } from 'redis';
import assert from 'node:assert/strict';

const url = process.argv[2];
const prefix = process.argv[3] ?? 'node';
const fail = (e) => { console.error(e); process.exit(1); };
const client = createClient({ url, socket: { reconnectStrategy: false, connectTimeout: 5000 } });
client.on('error', fail);
setTimeout(() => fail(new Error('timed out')), 20000).unref();

await client.connect();
const k = (name) => `${prefix}:${name}`;

await client.set(k('s'), 'v');
assert.equal(await client.get(k('s')), 'v');
assert.equal(await client.get(k('missing')), null);
await client.hSet(k('h'), { f: '1', g: '2' });
assert.deepEqual({ ...(await client.hGetAll(k('h'))) }, { f: '1', g: '2' });
assert.deepEqual(await client.mGet([k('s'), k('missing'), k('other')]), ['v', null, null]);

// A pipeline, and a transaction (one slot: the proxy may have a cluster behind it).
const piped = await client.multi().set(k('a'), '1').incr(k('a')).get(k('a')).execAsPipeline();
assert.deepEqual(piped, ['OK', 2, '2']);
const tag = `{${prefix}}`;
const txn = await client.multi().incr(`${tag}c`).incr(`${tag}c`).hSet(`${tag}h`, 'x', '1').exec();
assert.deepEqual(txn, [1, 2, 1]);

// Pub/sub: a subscriber gets a message published by another connection.
const sub = client.duplicate();
sub.on('error', fail);
await sub.connect();
const got = new Promise((resolve) => sub.subscribe(k('ch'), (message) => resolve(message)));
await new Promise((r) => setTimeout(r, 100));
assert.equal(await client.publish(k('ch'), 'hi'), 1);
assert.equal(await got, 'hi');
await sub.unsubscribe(k('ch'));
assert.equal(await sub.get(k('s')), 'v');
await sub.quit();

// A blocking pop, woken by a push from another connection.
const blocker = client.duplicate();
blocker.on('error', fail);
await blocker.connect();
const popped = blocker.blPop(k('q'), 5);
await new Promise((r) => setTimeout(r, 100));
await client.lPush(k('q'), 'x');
assert.deepEqual({ ...(await popped) }, { key: k('q'), element: 'x' });
await blocker.quit();

// SCAN over every key of the app.
for (let i = 0; i < 20; i++) await client.set(k(`scan:${i}`), String(i));
const seen = new Set();
for await (const keys of client.scanIterator({ MATCH: k('scan:*'), COUNT: 5 })) {
  for (const key of keys) seen.add(key);
}
assert.equal(seen.size, 20);

// Client-side caching: the second GET is served from the cache; a write from another
// connection invalidates it, and the next reads see the new value.
const cached = createClient({
  url,
  RESP: 3,
  clientSideCache: { ttl: 0, maxEntries: 0 },
  socket: { reconnectStrategy: false, connectTimeout: 5000 },
});
cached.on('error', fail);
await cached.connect();
await client.set(k('cached'), '1');
assert.equal(await cached.get(k('cached')), '1');
assert.equal(await cached.get(k('cached')), '1');
assert.ok(cached.clientSideCache.stats().hitCount >= 1, 'a cache hit');
await client.set(k('cached'), '2');
const until = Date.now() + 5000;
while ((await cached.get(k('cached'))) !== '2' && Date.now() < until) {
  await new Promise((r) => setTimeout(r, 10));
}
assert.equal(await cached.get(k('cached')), '2');
const invalidated = cached.clientSideCache.stats();
assert.ok(invalidated.hitCount >= 2, `hits after the invalidation: ${JSON.stringify(invalidated)}`);
await cached.quit();

const hello = await client.sendCommand(['HELLO']);
assert.equal(hello.proto, 3);
await client.quit();
console.log('ok');
