// pushnode.js in headless Chromium notices a connection that went silent without closing, and
// reconnects. The test that runs this script holds the connection open but silent (a proxy
// that stops carrying it) once this script prints "connected".
// Usage: node liveness.mjs NODE_BASE_URL PROXIED_WS_URL TOKEN
import { chromium } from "playwright-core";
import readline from "node:readline";

const [base, wsUrl, token] = process.argv.slice(2);
if (!token) {
  console.error("usage: node liveness.mjs NODE_BASE_URL PROXIED_WS_URL TOKEN");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
try {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  const events = [];
  let welcomes = 0;
  let onWelcome = () => {};
  await page.exposeFunction("report", (event, value) => {
    events.push(`${event} ${JSON.stringify(value)}`);
    if (event === "welcome") {
      welcomes += 1;
      onWelcome();
    }
  });
  await page.goto(`${base}/pushnode.js`);
  await page.addScriptTag({ url: `${base}/pushnode.js` });
  const waitWelcomes = (n, ms) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${welcomes} welcomes after ${ms} ms: ${events.join("; ")}`)), ms);
      onWelcome = () => { if (welcomes >= n) { clearTimeout(timer); resolve(); } };
      onWelcome();
    });
  await page.evaluate(({ wsUrl, token }) => {
    const push = new PushNode({ url: wsUrl, getToken: async () => token, pingInterval: 500, pongTimeout: 500 });
    for (const event of ["welcome", "close", "reconnect"]) {
      push.on(event, (v) => window.report(event, event === "welcome" ? v.type : v));
    }
    push.connect();
  }, { wsUrl, token });
  await waitWelcomes(1, 10000);
  // Quiet, but answered: the pings keep it up for a while.
  await new Promise((r) => setTimeout(r, 2000));
  if (welcomes !== 1) throw new Error(`reconnected while the node answered: ${events.join("; ")}`);
  console.log("connected");
  // The test freezes the connection now and says so on stdin.
  const stdin = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => stdin.once("line", resolve));
  stdin.close();
  const frozen = Date.now();
  await waitWelcomes(2, 10000);
  const took = Date.now() - frozen;
  if (!events.some((e) => e.startsWith("close") && e.includes("1006"))) throw new Error(events.join("; "));
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log(`reconnected ${took} ms after the freeze: ${events.join("; ")}`);
} finally {
  await browser.close();
}
