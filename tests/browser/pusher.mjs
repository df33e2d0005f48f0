// Pusher protocol scenarios run with clients nobody here wrote: pusher-js (the browser SDK, its
// Node build), laravel-echo on top of it, and the `pusher` server SDK for the HTTP API.
//
//   node pusher.mjs <scenario> '<config JSON>'
//
// config: { nodes: ["127.0.0.1:port", ...] (public listeners), api: "127.0.0.1:port",
//           appId, key, secret }. Exits 0 when the scenario held, 1 with the reason otherwise.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const Pusher = require('pusher-js');
const PusherServer = require('pusher');
const { default: Echo } = await import('laravel-echo');

const [scenario, configText] = process.argv.slice(2);
const config = JSON.parse(configText);
const WAIT_MS = 10000;

const [apiHost, apiPort] = config.api.split(':');
function server(overrides = {}) {
  return new PusherServer({
    appId: config.appId,
    key: config.key,
    secret: config.secret,
    host: apiHost,
    port: apiPort,
    useTLS: false,
    ...overrides,
  });
}

/// A pusher-js client on node `i`, authorising channels with the server SDK (as an app's
/// /broadcasting/auth endpoint would); `user` is the presence identity it signs
/// (`{user_id, user_info}`).
function client(i, { key = config.key, authServer = server(), user, signinAs } = {}) {
  const [host, port] = config.nodes[i].split(':');
  return new Pusher(key, {
    wsHost: host,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ['ws'],
    cluster: 'local',
    disableStats: true,
    userAuthentication: {
      customHandler: ({ socketId }, callback) => callback(null, authServer.authenticateUser(socketId, signinAs)),
    },
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) => {
        const presence = channelName.startsWith('presence-') ? user : undefined;
        callback(null, authServer.authorizeChannel(socketId, channelName, presence));
      },
    },
  });
}

function within(what, promise, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function connected(pusher) {
  return within('connection', new Promise((resolve, reject) => {
    pusher.connection.bind('connected', () => resolve(pusher.connection.socket_id));
    pusher.connection.bind('failed', () => reject(new Error('connection failed')));
  }));
}

function subscribed(pusher, name) {
  const channel = pusher.subscribe(name);
  return within(`subscription to ${name}`, new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_succeeded', () => resolve(channel));
    channel.bind('pusher:subscription_error', (e) => reject(new Error(`subscription error ${JSON.stringify(e)}`)));
  }));
}

/// The next `event` on `channel`, collected from the moment of the call.
function next(channel, event) {
  return within(`${event} on ${channel.name}`, new Promise((resolve) => {
    const handler = (data) => {
      channel.unbind(event, handler);
      resolve(data);
    };
    channel.bind(event, handler);
  }));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Waits until `check()` holds (polling every 20 ms).
function until(what, check, ms = WAIT_MS) {
  return within(what, (async () => {
    while (!check()) await sleep(20);
  })(), ms);
}

const ann = { user_id: 1, user_info: { name: 'Ann' } };
const bob = { user_id: 2, user_info: { name: 'Bob' } };
const carl = { user_id: 'carl', user_info: { name: 'Carl' } };

/// Reads one line from standard input (the Rust side's go-ahead).
function line() {
  return new Promise((resolve) => process.stdin.once('data', (d) => resolve(d.toString().trim())));
}

const scenarios = {
  // Two sockets on two nodes; the server SDK publishes through the first node's API.
  async public_across_nodes() {
    const [a, b] = [client(0), client(1)];
    const [socketA] = await Promise.all([connected(a), connected(b)]);
    assert.match(socketA, /^\d+\.\d+$/);
    const [ca, cb] = await Promise.all([subscribed(a, 'news'), subscribed(b, 'news')]);
    const [ga, gb] = [next(ca, 'headline'), next(cb, 'headline')];
    await server().trigger('news', 'headline', { title: 'first' });
    assert.deepEqual(await ga, { title: 'first' });
    assert.deepEqual(await gb, { title: 'first' });

    // toOthers(): the socket_id's socket is skipped, everyone else gets it.
    let leaked = null;
    ca.bind('excluded', (data) => { leaked = data; });
    const onlyB = next(cb, 'excluded');
    await server().trigger('news', 'excluded', { n: 2 }, { socket_id: socketA });
    assert.deepEqual(await onlyB, { n: 2 });
    // A later event reaches A, so A's silence above was the exclusion, not a dead channel.
    const after = next(ca, 'after');
    await server().trigger('news', 'after', { n: 3 });
    await after;
    assert.equal(leaked, null, 'the excluded socket got the event');

    // Several channels in one call, and a batch.
    const [cc] = await Promise.all([subscribed(b, 'sports')]);
    const [m1, m2] = [next(cb, 'multi'), next(cc, 'multi')];
    await server().trigger(['news', 'sports'], 'multi', 'plain string');
    assert.equal(await m1, 'plain string');
    assert.equal(await m2, 'plain string');
    const [b1, b2] = [next(cb, 'one'), next(cc, 'two')];
    await server().triggerBatch([
      { channel: 'news', name: 'one', data: { i: 1 } },
      { channel: 'sports', name: 'two', data: { i: 2 } },
    ]);
    assert.deepEqual(await b1, { i: 1 });
    assert.deepEqual(await b2, { i: 2 });
    a.disconnect();
    b.disconnect();
  },

  async private_channels() {
    const a = client(0);
    await connected(a);
    const channel = await subscribed(a, 'private-orders');
    const got = next(channel, 'shipped');
    await server().trigger('private-orders', 'shipped', { order: 7 });
    assert.deepEqual(await got, { order: 7 });

    // Signed with another secret: a channel-scoped subscription error, and the socket stays.
    const forger = client(0, { authServer: server({ secret: 'not-the-secret' }) });
    await connected(forger);
    const refused = forger.subscribe('private-orders');
    const error = await within('subscription error', new Promise((resolve) => {
      refused.bind('pusher:subscription_error', resolve);
      refused.bind('pusher:subscription_succeeded', () => resolve('succeeded'));
    }));
    assert.equal(error.type, 'AuthError', JSON.stringify(error));
    assert.equal(error.status, 401);
    assert.equal(forger.connection.state, 'connected');
    await subscribed(forger, 'public-still-works');
    a.disconnect();
    forger.disconnect();
  },

  // End-to-end encrypted: the node relays ciphertext it cannot read; pusher-js decrypts.
  async encrypted_channels() {
    const masterKey = Buffer.alloc(32, 7).toString('base64');
    const sdk = server({ encryptionMasterKeyBase64: masterKey });
    const a = client(0, { authServer: sdk });
    await connected(a);
    const channel = await subscribed(a, 'private-encrypted-vault');
    const got = next(channel, 'secret');
    await sdk.trigger('private-encrypted-vault', 'secret', { code: 1234 });
    assert.deepEqual(await got, { code: 1234 });
    a.disconnect();
  },

  async unknown_key_is_refused_with_4001() {
    const a = client(0, { key: 'no-such-key' });
    const seen = [];
    await within('error 4001', new Promise((resolve) => a.connection.bind('error', (error) => {
      seen.push(error);
      // During the handshake pusher-js wraps the refusal: {type: 'WebSocketError', error: {...}}.
      const refusal = error?.error ?? error;
      if (refusal?.type === 'PusherError' && refusal.data?.code === 4001) resolve();
    }))).catch((e) => { throw new Error(`${e.message}; errors seen: ${JSON.stringify(seen)}`); });
    // pusher-js does not retry a 4000-4099 refusal.
    await within('disconnected', new Promise((resolve) => {
      if (a.connection.state === 'disconnected') resolve();
      a.connection.bind('disconnected', resolve);
    }));
    a.disconnect();
  },

  // Echo's whisper: client events between sockets on two nodes, never echoed to the sender.
  async whisper() {
    const [a, b] = [client(0), client(1)];
    await Promise.all([connected(a), connected(b)]);
    const [ca, cb] = await Promise.all([subscribed(a, 'private-chat'), subscribed(b, 'private-chat')]);
    let echoed = false;
    ca.bind('client-typing', () => { echoed = true; });
    const heard = next(cb, 'client-typing');
    assert.ok(ca.trigger('client-typing', { who: 'a' }));
    assert.deepEqual(await heard, { who: 'a' });
    const back = next(ca, 'client-typing');
    assert.ok(cb.trigger('client-typing', { who: 'b' }));
    assert.deepEqual(await back, { who: 'b' });
    assert.equal(echoed, true); // that was b's
    echoed = false;
    const again = next(cb, 'client-typing');
    ca.trigger('client-typing', { who: 'a', n: 2 });
    await again;
    await sleep(200);
    assert.equal(echoed, false, 'the sender got its own client event');
    a.disconnect();
    b.disconnect();
  },

  // Laravel Echo on pusher-js, as a Laravel front end uses it.
  async laravel_echo() {
    const [host, port] = config.nodes[0].split(':');
    // Echo as resources/js/echo.js sets it up, with `sdk` standing in for /broadcasting/auth.
    const echoWith = (sdk) => new Echo({
      broadcaster: 'pusher',
      key: config.key,
      wsHost: host,
      wsPort: Number(port),
      forceTLS: false,
      enabledTransports: ['ws'],
      cluster: 'local',
      disableStats: true,
      Pusher,
      authorizer: (channel) => ({
        authorize: (socketId, callback) => callback(null, sdk.authorizeChannel(socketId, channel.name)),
      }),
    });
    const sdk = server();
    const echo = echoWith(sdk);
    const shipped = within('OrderShipped', new Promise((resolve) => {
      echo.private('orders.7').listen('.OrderShipped', resolve);
    }));
    const publicEvent = within('public event', new Promise((resolve) => {
      echo.channel('announcements').listen('.Announced', resolve);
    }));
    // Echo subscribes on connect; publish once both subscriptions are confirmed.
    const pusher = echo.connector.pusher;
    await within('echo subscriptions', (async () => {
      while (!(pusher.channel('private-orders.7')?.subscribed && pusher.channel('announcements')?.subscribed)) {
        await sleep(20);
      }
    })());
    await sdk.trigger('private-orders.7', 'OrderShipped', { order: { id: 7 } });
    await sdk.trigger('announcements', 'Announced', { text: 'hi' });
    assert.deepEqual(await shipped, { order: { id: 7 } });
    assert.deepEqual(await publicEvent, { text: 'hi' });

    // .error() fires on a refused authorisation.
    const forged = echoWith(server({ secret: 'not-the-secret' }));
    const failure = await within('echo .error()', new Promise((resolve) => {
      forged.private('orders.8').error(resolve);
    }));
    assert.equal(failure.status, 401, JSON.stringify(failure));
    echo.disconnect();
    forged.disconnect();
  },

  // The server SDK signing with a wrong secret gets 401 and publishes nothing.
  async api_refuses_a_wrong_signature() {
    const a = client(0);
    await connected(a);
    const channel = await subscribed(a, 'guarded');
    let leaked = null;
    channel.bind('forged', (d) => { leaked = d; });
    const status = await server({ secret: 'not-the-secret' }).trigger('guarded', 'forged', {}).then(
      () => 200,
      (e) => e.status,
    );
    assert.equal(status, 401);
    const fine = next(channel, 'fine');
    await server().trigger('guarded', 'fine', {});
    await fine;
    assert.equal(leaked, null);
    a.disconnect();
  },
};

// Presence across two nodes: one member per user, not per tab or node; joins and leaves
// announced once; client events carry the sender's user id.
scenarios.presence_across_nodes = async () => {
  const [ann1, bobby] = [client(0, { user: ann }), client(1, { user: bob })];
  await Promise.all([connected(ann1), connected(bobby)]);
  const bobRoom = await subscribed(bobby, 'presence-room');
  assert.equal(bobRoom.members.count, 1);
  assert.equal(bobRoom.members.me.info.name, 'Bob');
  const added = next(bobRoom, 'pusher:member_added');
  const annRoom = await subscribed(ann1, 'presence-room');
  assert.equal(annRoom.members.count, 2, 'Ann sees herself and Bob');
  assert.equal(annRoom.members.get(2).info.name, 'Bob');
  const member = await added;
  assert.equal(String(member.id), '1');
  assert.equal(member.info.name, 'Ann');

  // Ann's second tab, on the other node: no new member, nobody is told.
  const events = [];
  bobRoom.bind('pusher:member_added', (m) => events.push(['added', String(m.id)]));
  bobRoom.bind('pusher:member_removed', (m) => events.push(['removed', String(m.id)]));
  const ann2 = client(1, { user: ann });
  await connected(ann2);
  const ann2Room = await subscribed(ann2, 'presence-room');
  assert.equal(ann2Room.members.count, 2);

  // A whisper on a presence channel names its sender.
  const whisper = within('whisper', new Promise((resolve) => {
    bobRoom.bind('client-typing', (data, metadata) => resolve(metadata));
  }));
  ann2Room.trigger('client-typing', { typing: true });
  assert.equal(String((await whisper).user_id), '1');

  // Ann's first tab closes: she is still there (the other tab).
  ann1.disconnect();
  await sleep(1000); // a quiet window: a wrong announcement would come within milliseconds
  assert.deepEqual(events, []);
  assert.equal(bobRoom.members.count, 2);

  // Her last tab closes: she leaves, announced once.
  ann2.disconnect();
  await until('member_removed', () => events.length > 0);
  await sleep(500);
  assert.deepEqual(events, [['removed', '1']]);
  assert.equal(bobRoom.members.count, 1);
  bobby.disconnect();
};

// A node killed with SIGKILL: its members are announced gone by the surviving node within
// the presence TTL plus a third of it. The Rust side kills the node on "kill".
scenarios.presence_node_killed = async () => {
  const survivor = client(0, { user: bob });
  const doomed = client(1, { user: carl });
  await Promise.all([connected(survivor), connected(doomed)]);
  const room = await subscribed(survivor, 'presence-room');
  const joined = next(room, 'pusher:member_added');
  await subscribed(doomed, 'presence-room');
  assert.equal((await joined).id, 'carl');
  const removed = within('carl removed', new Promise((resolve) => room.bind('pusher:member_removed', resolve)));
  console.log('kill');
  assert.equal(await line(), 'killed');
  const start = Date.now();
  assert.equal((await removed).id, 'carl');
  const elapsed = Date.now() - start;
  console.log(`removed after ${elapsed} ms`);
  assert.ok(elapsed <= config.killBoundMs, `removed after ${elapsed} ms, bound ${config.killBoundMs} ms`);
  assert.equal(room.members.count, 1);
  survivor.disconnect();
  doomed.disconnect();
};

// Laravel Echo's presence API: here(), joining(), leaving().
scenarios.echo_presence = async () => {
  const echoOn = (i, user) => {
    const [host, port] = config.nodes[i].split(':');
    const sdk = server();
    return new Echo({
      broadcaster: 'pusher', key: config.key, wsHost: host, wsPort: Number(port), forceTLS: false,
      enabledTransports: ['ws'], cluster: 'local', disableStats: true, Pusher,
      authorizer: (channel) => ({
        authorize: (socketId, callback) => callback(null, sdk.authorizeChannel(socketId, channel.name, user)),
      }),
    });
  };
  const a = echoOn(0, ann);
  const joining = [];
  const leaving = [];
  const here = await within('here()', new Promise((resolve) => {
    a.join('chat').here(resolve).joining((u) => joining.push(u)).leaving((u) => leaving.push(u));
  }));
  assert.deepEqual(here, [{ name: 'Ann' }]);
  const b = echoOn(1, bob);
  const hereB = await within('here() on b', new Promise((resolve) => b.join('chat').here(resolve)));
  assert.deepEqual(hereB.map((u) => u.name).sort(), ['Ann', 'Bob']);
  await until('joining()', () => joining.length === 1);
  assert.deepEqual(joining, [{ name: 'Bob' }]);
  b.leave('chat');
  await until('leaving()', () => leaving.length === 1);
  assert.deepEqual(leaving, [{ name: 'Bob' }]);
  a.disconnect();
  b.disconnect();
};

// sendToUser reaches every signed-in socket of the user on every node, and nobody else;
// terminateUserConnections closes them all (4009, no reconnect).
scenarios.send_to_user = async () => {
  const [u1a, u1b, u2] = [client(0, { signinAs: { id: 'u1' } }), client(1, { signinAs: { id: 'u1' } }), client(1, { signinAs: { id: 'u2' } })];
  for (const c of [u1a, u1b, u2]) c.signin();
  await Promise.all([u1a, u1b, u2].map(connected));
  await Promise.all([u1a, u1b, u2].map((c) => within('signin', c.user.signinDonePromise)));
  await until('user channels subscribed', () => [u1a, u1b, u2].every((c) => c.user.serverToUserChannel?.subscribed));
  const got = (c) => within('user event', new Promise((resolve) => c.user.bind('notice', resolve)));
  const u2got = [];
  u2.user.bind('notice', (d) => u2got.push(d));
  const [ga, gb] = [got(u1a), got(u1b)];
  await server().sendToUser('u1', 'notice', { n: 1 });
  assert.deepEqual(await ga, { n: 1 });
  assert.deepEqual(await gb, { n: 1 });
  const other = got(u2);
  await server().sendToUser('u2', 'notice', { n: 2 });
  assert.deepEqual(await other, { n: 2 });
  assert.deepEqual(u2got, [{ n: 2 }], 'u2 got only its own');

  const closed = (c) => within('terminated', new Promise((resolve) => c.connection.bind('error', (e) => {
    const error = e?.error ?? e;
    if (error?.data?.code === 4009) resolve();
  })));
  const [ca, cb] = [closed(u1a), closed(u1b)];
  await server().terminateUserConnections('u1');
  await ca;
  await cb;
  await sleep(300);
  assert.equal(u2.connection.state, 'connected', 'another user stays');
  for (const c of [u1a, u1b, u2]) c.disconnect();
};

// Channel queries through the server SDK: counts and members across two nodes.
scenarios.channel_queries = async () => {
  const [a, b] = [client(0, { user: ann }), client(1, { user: bob })];
  await Promise.all([connected(a), connected(b)]);
  await Promise.all([subscribed(a, 'news'), subscribed(b, 'news'), subscribed(b, 'presence-lobby'), subscribed(a, 'presence-lobby')]);
  const sdk = server();
  const get = async (path, params = {}) => {
    const response = await sdk.get({ path, params });
    return response.json();
  };
  // Counts are written every second by each node: wait for both nodes' to show.
  let news;
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    news = await get('/channels/news', { info: 'subscription_count' });
    if (news.subscription_count === 2 || Date.now() > deadline) break;
    await sleep(100);
  }
  assert.deepEqual(news, { occupied: true, subscription_count: 2 });
  const lobby = await get('/channels/presence-lobby', { info: 'user_count,subscription_count' });
  assert.equal(lobby.user_count, 2);
  assert.equal(lobby.occupied, true);
  const users = await get('/channels/presence-lobby/users');
  assert.deepEqual(users.users.map((u) => u.id).sort(), ['1', '2']);
  const list = await get('/channels');
  assert.deepEqual(Object.keys(list.channels).sort(), ['news', 'presence-lobby']);
  const presence = await get('/channels', { filter_by_prefix: 'presence-', info: 'user_count' });
  assert.deepEqual(presence.channels, { 'presence-lobby': { user_count: 2 } });
  const empty = await get('/channels/nobody-here', { info: 'subscription_count' });
  assert.deepEqual(empty, { occupied: false, subscription_count: 0 });
  // A publish can ask for the counts of the channels it went to.
  const published = await (await sdk.trigger('news', 'e', {}, { info: 'subscription_count' })).json();
  assert.deepEqual(published, { channels: { news: { subscription_count: 2 } } });
  a.disconnect();
  b.disconnect();
};

// Laravel notifications wait for users who were offline: published while nobody listened,
// Echo's .notification() gets them when the user's page subscribes, tagged with their inbox
// id; pushnode:read marks them read and every tab hears the new count.
scenarios.notifications_wait_for_offline_users = async () => {
  const NOTIFICATION = 'Illuminate\\Notifications\\Events\\BroadcastNotificationCreated';
  const sdk = server();
  // Sent while user 42 has no page open (as Laravel's pusher broadcaster sends them).
  await sdk.trigger('private-App.Models.User.42', NOTIFICATION, { id: 'uuid-1', type: 'App\\Notifications\\Hello', title: 'While away' });
  await sdk.trigger('private-App.Models.User.42', NOTIFICATION, { id: 'uuid-2', type: 'App\\Notifications\\Hello', title: 'Also away' });

  const echoOn = (i) => {
    const [host, port] = config.nodes[i].split(':');
    return new Echo({
      broadcaster: 'pusher', key: config.key, wsHost: host, wsPort: Number(port), forceTLS: false,
      enabledTransports: ['ws'], cluster: 'local', disableStats: true, Pusher,
      authorizer: (channel) => ({
        authorize: (socketId, callback) => callback(null, sdk.authorizeChannel(socketId, channel.name)),
      }),
    });
  };
  const page = echoOn(1);
  const received = [];
  const counts = [];
  page.private('App.Models.User.42')
    .notification((n) => received.push(n))
    .listen('.pushnode:unread', (e) => counts.push(e.unread));
  await until('the kept notifications', () => received.length === 2 && counts.length === 1)
    .catch((e) => { throw new Error(`${e.message}: got ${JSON.stringify(received)}, counts ${JSON.stringify(counts)}`); });
  assert.deepEqual(received.map((n) => n.title), ['While away', 'Also away']);
  assert.deepEqual(received.map((n) => n.id), ['uuid-1', 'uuid-2']);
  assert.ok(received.every((n) => n.pushnode.replay === true && /^\d+-\d+$/.test(n.pushnode.id)), JSON.stringify(received));
  assert.deepEqual(counts, [2]);

  // Live, while the page is open: tagged with the new unread count.
  await sdk.trigger('private-App.Models.User.42', NOTIFICATION, { id: 'uuid-3', title: 'Live' });
  await until('the live notification', () => received.length === 3);
  assert.equal(received[2].title, 'Live');
  assert.equal(received[2].pushnode.unread, 3);
  // Another event on the channel is not kept.
  await sdk.trigger('private-App.Models.User.42', 'OrderShipped', { n: 1 });

  // Read up to the first one, then all: every tab hears the count.
  const pusher = page.connector.pusher;
  pusher.send_event('pushnode:read', { up_to: received[0].pushnode.id }, 'private-App.Models.User.42');
  await until('unread 2', () => counts.at(-1) === 2);
  pusher.send_event('pushnode:read', { all: true }, 'private-App.Models.User.42');
  await until('unread 0', () => counts.at(-1) === 0);
  page.disconnect();

  // The next visit replays nothing: all were read.
  const again = echoOn(0);
  const replayed = [];
  const countsAgain = [];
  again.private('App.Models.User.42')
    .notification((n) => replayed.push(n))
    .listen('.pushnode:unread', (e) => countsAgain.push(e.unread));
  await until('the unread count', () => countsAgain.length === 1);
  assert.deepEqual(countsAgain, [0]);
  assert.deepEqual(replayed, []);
  again.disconnect();
};

const run = scenarios[scenario];
if (!run) {
  console.error(`unknown scenario ${scenario}; one of ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
try {
  await run();
  console.log(`${scenario}: ok`);
  process.exit(0);
} catch (e) {
  console.error(`${scenario}: ${e.stack || e}`);
  process.exit(1);
}
