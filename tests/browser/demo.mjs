// Drives the demo page in headless Chromium: open it, press send, see the badge change.
// Usage: node demo.mjs http://127.0.0.1:PORT [screenshot.png]
import { chromium } from "playwright-core";

const base = process.argv[2];
const screenshot = process.argv[3];
if (!base) {
  console.error("usage: node demo.mjs BASE_URL [screenshot.png]");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const context = await browser.newContext();
  const open = async () => {
    const page = await context.newPage();
    page.on("pageerror", (e) => { throw new Error("page error: " + e.message); });
    await page.goto(`${base}/?user=7`);
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 10000 });
    return page;
  };
  const badge = (page) => page.textContent("#badge");
  const waitBadge = (page, n) =>
    page.waitForFunction((n) => document.getElementById("badge").textContent === String(n), n, { timeout: 10000 });

  const tab1 = await open();
  if ((await badge(tab1)) !== "0") throw new Error("badge should start at 0");
  await tab1.click("#send");
  await waitBadge(tab1, 1);
  const items = await tab1.locator("#list li").count();
  if (items !== 1) throw new Error(`expected 1 notification in the list, got ${items}`);
  const title = await tab1.textContent("#list li strong");
  if (title !== "Test notification") throw new Error(`unexpected title ${title}`);

  // A second tab of the same user receives what is sent from either.
  const tab2 = await open();
  await tab2.click("#send");
  await waitBadge(tab2, 1);
  await waitBadge(tab1, 2);

  // Clicking a notification marks it read locally.
  await tab1.click("#list li >> nth=0");
  await waitBadge(tab1, 1);

  if (screenshot) await tab1.screenshot({ path: screenshot });
  console.log("demo page ok: badge went 0 -> 1 -> 2, second tab in step");
} finally {
  await browser.close();
}
