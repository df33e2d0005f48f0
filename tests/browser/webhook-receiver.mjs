// A webhook receiver for the tests: every call is checked with the `pusher` server SDK's own
// webhook validation (X-Pusher-Key and X-Pusher-Signature over the raw body), and its events
// are kept. Controlled over HTTP:
//
//   POST /hook           a webhook call: 200, or whatever the mode says
//   GET  /events         {"valid": [events...], "invalid": n, "calls": n}
//   POST /mode/<mode>    ok | fail (500) | hang (never answers) | redirect (302 to itself) |
//                        huge (accepts, then answers 200 with a 64 MiB body)
//
//   node webhook-receiver.mjs '<config JSON>'   config: { key, secret }
// Prints "listening <port>" once ready; stops when its standard input closes.
import http from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const Pusher = require('pusher');
const config = JSON.parse(process.argv[2]);
const sdk = new Pusher({ appId: '1', key: config.key, secret: config.secret });

const valid = [];
let invalid = 0;
let calls = 0;
let mode = 'ok';

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString('utf8');
    if (req.method === 'GET' && req.url === '/events') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ valid, invalid, calls }));
      return;
    }
    if (req.method === 'POST' && req.url.startsWith('/mode/')) {
      mode = req.url.slice('/mode/'.length);
      res.end('ok');
      return;
    }
    if (req.method === 'POST' && req.url === '/hook') {
      calls += 1;
      if (mode === 'hang') return; // never answers
      if (mode === 'fail') {
        res.writeHead(500);
        res.end('failing on purpose');
        return;
      }
      if (mode === 'redirect') {
        res.writeHead(302, { location: '/hook' });
        res.end();
        return;
      }
      const webhook = sdk.webhook({ headers: req.headers, rawBody: body });
      if (webhook.isValid() && mode === 'huge') {
        valid.push(...webhook.getEvents());
        res.writeHead(200, { 'content-length': String(64 << 20) });
        const chunk = Buffer.alloc(1 << 20, 120);
        let left = 64;
        const more = () => {
          while (left > 0) {
            left -= 1;
            if (!res.write(chunk)) return res.once('drain', more);
          }
          res.end();
        };
        res.on('error', () => {});
        more();
      } else if (webhook.isValid()) {
        valid.push(...webhook.getEvents());
        res.end('ok');
      } else {
        invalid += 1;
        res.writeHead(401);
        res.end('bad signature');
      }
      return;
    }
    res.writeHead(404);
    res.end();
  });
});
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
