// pusher-js and Laravel Echo in headless Chromium (their browser builds, as a Laravel page
// loads them), against a node with a Pusher app and kept notifications.
//
//   node pusher-browser.mjs '<config JSON>'
//
// config: { base: "http://127.0.0.1:port" (the node's public listener), appId, key, secret }.
// Channel authorisation is the server SDK in this process, exposed to the page as
// window.authorize (what a Laravel page's /broadcasting/auth does).
import { createRequire } from 'node:module';
import path from 'node:path';
import { chromium } from 'playwright-core';

const require = createRequire(import.meta.url);
const PusherServer = require('pusher');
const config = JSON.parse(process.argv[2]);
const url = new URL(config.base);
const sdk = new PusherServer({
  appId: config.appId, key: config.key, secret: config.secret,
  host: url.hostname, port: url.port, useTLS: false,
});
const NOTIFICATION = 'Illuminate\\Notifications\\Events\\BroadcastNotificationCreated';
const modules = path.join(path.dirname(new URL(import.meta.url).pathname), 'node_modules');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const errors = [];
const fail = (message) => { throw new Error(message); };

/// A page of user `user` running Echo on pusher-js, listening to its notifications, its
/// private `orders` channel and the presence room.
async function open(context, user) {
  const page = await context.newPage();
  page.on('pageerror', (e) => errors.push(e.message));
  await page.exposeFunction('authorize', (socketId, channel) =>
    sdk.authorizeChannel(socketId, channel, channel.startsWith('presence-') ? user : undefined));
  await page.goto(`${config.base}/`);
  await page.addScriptTag({ path: path.join(modules, 'pusher-js/dist/web/pusher.min.js') });
  await page.addScriptTag({ path: path.join(modules, 'laravel-echo/dist/echo.iife.js') });
  await page.evaluate(({ key, host, port, id }) => {
    window.got = { notifications: [], orders: [], here: null, joining: [] };
    window.echo = new (Echo.default || Echo)({
      broadcaster: 'pusher', key, wsHost: host, wsPort: Number(port), forceTLS: false,
      enabledTransports: ['ws'], cluster: 'local', disableStats: true,
      authorizer: (channel) => ({
        authorize: (socketId, callback) => window.authorize(socketId, channel.name).then((a) => callback(null, a)),
      }),
    });
    echo.private(`App.Models.User.${id}`).notification((n) => got.notifications.push(n));
    echo.private('orders').listen('.OrderShipped', (e) => got.orders.push(e));
    echo.join('room').here((users) => { got.here = users; }).joining((u) => got.joining.push(u));
  }, { key: config.key, host: url.hostname, port: url.port, id: user.user_id });
  return page;
}

const waitFor = (page, what, fn, arg) =>
  page.waitForFunction(fn, arg, { timeout: 10000 }).catch(() => fail(`timed out waiting for ${what}`));

try {
  // Sent while the browser is closed.
  await sdk.trigger('private-App.Models.User.42', NOTIFICATION, { id: 'uuid-1', title: 'While you were away' });

  const context = await browser.newContext();
  const page = await open(context, { user_id: 42, user_info: { name: 'Ann' } });
  await waitFor(page, 'the kept notification', () => window.got.notifications.length === 1);
  const [note] = await page.evaluate(() => window.got.notifications);
  if (note.title !== 'While you were away' || note.id !== 'uuid-1' || note.pushnode?.replay !== true) {
    fail(`unexpected notification ${JSON.stringify(note)}`);
  }
  await waitFor(page, 'here()', () => Array.isArray(window.got.here));
  await waitFor(page, 'the orders subscription', () => window.echo.connector.pusher.channel('private-orders')?.subscribed);
  await sdk.trigger('private-orders', 'OrderShipped', { order: 7 });
  await waitFor(page, 'the live event', () => window.got.orders.length === 1);

  // A second user's page: the first sees them join.
  const other = await open(context, { user_id: 43, user_info: { name: 'Bob' } });
  await waitFor(other, "Bob's here()", () => Array.isArray(window.got.here) && window.got.here.length === 2);
  await waitFor(page, 'joining()', () => window.got.joining.length === 1);
  const joined = await page.evaluate(() => window.got.joining[0]);
  if (joined.name !== 'Bob') fail(`joining() got ${JSON.stringify(joined)}`);
  if (errors.length) fail(`page errors: ${errors.join('; ')}`);
  console.log('pusher-js and Echo in Chromium: ok');
} catch (e) {
  console.error(e.stack || String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
