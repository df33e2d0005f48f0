// Drives the demo page in headless Chromium: open it, press send, see the badge change; a
// second tab stays in step; marking read updates both; the list survives a reload.
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
const errors = [];
try {
  const context = await browser.newContext();
  const open = async () => {
    const page = await context.newPage();
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`${base}/?user=7`);
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 10000 });
    return page;
  };
  const waitBadge = (page, n) =>
    page.waitForFunction((n) => document.getElementById("badge").textContent === String(n), n, { timeout: 10000 });
  const count = (page, selector) => page.locator(selector).count();
  const expect = (what, got, want) => {
    if (got !== want) throw new Error(`${what}: got ${got}, want ${want}`);
  };

  const tab1 = await open();
  await waitBadge(tab1, 0);
  await tab1.click("#send");
  await waitBadge(tab1, 1);
  expect("items in tab 1", await count(tab1, "#list li"), 1);
  expect("title", await tab1.textContent("#list li strong"), "Test notification");

  // A second tab gets the unread notification from the inbox, and both follow new ones.
  const tab2 = await open();
  await waitBadge(tab2, 1);
  expect("items replayed into tab 2", await count(tab2, "#list li"), 1);
  await tab2.click("#send");
  await waitBadge(tab2, 2);
  await waitBadge(tab1, 2);

  // Reading in one tab lowers the badge in both.
  await tab1.click("#list li >> nth=0");
  await waitBadge(tab1, 1);
  await waitBadge(tab2, 1);

  // The list survives a reload, read state included.
  await tab1.reload();
  await tab1.waitForSelector('#state[data-state="connected"]', { timeout: 10000 });
  await waitBadge(tab1, 1);
  await tab1.waitForFunction(() => document.querySelectorAll("#list li").length === 2, null, { timeout: 10000 });
  expect("unread items after reload", await count(tab1, "#list li.unread"), 1);

  await tab2.click("#readall");
  await waitBadge(tab1, 0);
  await waitBadge(tab2, 0);

  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  if (screenshot) await tab1.screenshot({ path: screenshot });
  console.log("demo page ok: badge follows the server count in two tabs; list survives a reload");
} finally {
  await browser.close();
}
