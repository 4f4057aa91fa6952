// Drives the web console in a real Chromium (Debian's, through
// playwright-core), as an operator would: sign in, create an address, add
// a webhook endpoint through the schema form, subscribe it, send test
// events with a file, follow them being delivered, retry a failed one,
// restart a plugin, sign out. Run by tests/tests/console.rs, which starts
// the server and the webhook's target and checks what the target got.
//
// Environment: ROBOGER_URL, ROBOGER_KEY, SINK_URL, SCREENSHOTS (a
// directory), and browser.mjs's.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { env, launch } from "./browser.mjs";

const base = env("ROBOGER_URL");
const key = env("ROBOGER_KEY");
const sink = env("SINK_URL");
const shots = env("SCREENSHOTS");

fs.mkdirSync(shots, { recursive: true });
const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(15000);

// No console errors, no failed requests, on any page.
const problems = [];
page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("requestfailed", (r) => {
  // An event stream is cut when its page is left.
  if (!r.url().includes("/events/stream")) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
});
page.on("response", (r) => {
  if (r.status() >= 500) problems.push(`${r.status()} from ${r.url()}`);
});

// Every visible control has an accessible name, and the page fits a phone.
async function checkPage(name) {
  const unnamed = await page.evaluate(() => {
    const out = [];
    for (const el of document.querySelectorAll("input, select, textarea, button, a[href]")) {
      if (el.type === "hidden") continue;
      const named = (el.labels && el.labels.length > 0) || el.getAttribute("aria-label") ||
        el.getAttribute("aria-labelledby") || el.getAttribute("title") ||
        ((el.tagName === "BUTTON" || el.tagName === "A") && el.textContent.trim());
      if (!named) out.push(el.outerHTML.slice(0, 120));
    }
    return out;
  });
  assert.deepEqual(unnamed, [], `${name}: controls without an accessible name`);
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: path.join(shots, `${name}-phone.png`), fullPage: true });
  await page.setViewportSize({ width: 1200, height: 900 });
  assert.ok(overflow <= 0, `${name}: wider than a phone by ${overflow}px`);
}

try {
  // A page without a session leads to sign-in.
  await page.goto(`${base}/ui/addr`);
  assert.match(page.url(), /\/ui\/signin\?next=/);
  await checkPage("signin");

  // A wrong key is refused; the right one, typed and submitted from the
  // keyboard, signs in and comes back to the page asked for.
  await page.getByLabel("Master key").fill("not the key");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "not the master key" }).waitFor();
  await page.getByLabel("Master key").focus();
  await page.keyboard.type(key);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: /^Addresses/ }).waitFor();
  assert.match(page.url(), /\/ui\/addr$/);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "roboger_console");
  assert.ok(session, "a session cookie");
  assert.equal(session.httpOnly, true);
  assert.equal(session.sameSite, "Strict");
  assert.equal(await page.evaluate(() => document.cookie), "", "scripts cannot read the session");

  // Create an address.
  await page.getByRole("button", { name: "Create address" }).click();
  await page.getByRole("heading", { name: /^Address \d+$/ }).waitFor();
  const addrId = (await page.getByRole("heading", { name: /^Address \d+$/ }).textContent()).split(" ")[1];
  await checkPage("address");
  await page.goto(`${base}/ui/addr?q=${addrId}`);
  await page.getByRole("link", { name: /^[A-Za-z0-9]{64}$/ }).first().waitFor();
  await checkPage("addresses");
  // Searched for whole, the address is found (through its index), and
  // alone; a longer search finds nothing.
  const addrText = (await page.getByRole("link", { name: /^[A-Za-z0-9]{64}$/ }).first().textContent()).trim();
  await page.goto(`${base}/ui/addr?q=${addrText}`);
  await page.getByRole("link", { name: addrText }).waitFor();
  assert.equal(await page.getByRole("link", { name: /^[A-Za-z0-9]{64}$/ }).count(), 1);
  await page.goto(`${base}/ui/addr?q=${addrText}x`);
  await page.getByRole("heading", { name: /^Addresses/ }).waitFor();
  assert.equal(await page.getByRole("link", { name: /^[A-Za-z0-9]{64}$/ }).count(), 0);
  await page.goto(`${base}/ui/addr?q=${addrId}`);
  await page.getByRole("link", { name: /^[A-Za-z0-9]{64}$/ }).first().click();

  // A webhook endpoint through the schema form: a bad URL first.
  await page.getByLabel("Plugin").selectOption("webhook");
  await page.getByRole("button", { name: "Add endpoint" }).click();
  await page.getByRole("heading", { name: /New webhook endpoint/ }).waitFor();
  await page.getByLabel("url").fill("not a url");
  await page.getByRole("button", { name: "Create endpoint" }).click();
  const error = page.getByRole("alert");
  await error.waitFor();
  assert.match(await error.textContent(), /url/i, "the plugin's error is shown");
  assert.equal(await page.getByLabel("url").inputValue(), "not a url", "the form keeps what was typed");
  await checkPage("endpoint-error");
  await page.getByLabel("url").fill(`${sink}/hook`);
  await page.getByLabel("template").fill('{"subject": $subject, "media": $media}');
  await page.getByLabel("method").selectOption("POST");
  await page.getByLabel("Description").fill("console test");
  await page.getByRole("button", { name: "Create endpoint" }).click();
  await page.getByRole("heading", { name: /^Endpoint \d+: webhook/ }).waitFor();
  const epId = (await page.getByRole("heading", { name: /^Endpoint \d+: webhook/ }).textContent()).match(/\d+/)[0];

  // Subscribe it to info and above.
  await page.getByRole("button", { name: `Subscribe endpoint ${epId}` }).click();
  await page.getByRole("button", { name: /^Save subscription \d+$/ }).waitFor();
  await checkPage("address-endpoint");

  // A test event with a file, delivered: the history shows it without a reload.
  await page.getByLabel("Subject").fill("first test");
  await page.getByLabel("File (optional)").setInputFiles({
    name: "hello.txt", mimeType: "text/plain", buffer: Buffer.from("hello from the console"),
  });
  await page.getByRole("button", { name: "Send test event" }).click();
  await page.getByRole("heading", { name: /^Events of address/ }).waitFor();
  const first = page.locator("article.event", { hasText: "first test" });
  await first.locator("tr.state-delivered").waitFor();
  assert.match(await first.textContent(), /hello\.txt, 22 bytes/);
  await checkPage("events");

  // The target fails the second event (max-attempts is 1): it shows failed,
  // and a retry delivers it.
  await page.goto(`${base}/ui/addr/${addrId}`);
  await page.getByLabel("Subject").fill("second test");
  await page.getByRole("button", { name: "Send test event" }).click();
  const second = page.locator("article.event", { hasText: "second test" });
  await second.locator("tr.state-failed").waitFor();
  assert.match(await second.textContent(), /500/, "the last error is shown");
  await checkPage("events-failed");
  await second.getByRole("button", { name: "Retry failed deliveries" }).click();
  await page.getByRole("status").filter({ hasText: "queued again" }).waitFor();
  await page.locator("article.event", { hasText: "second test" }).locator("tr.state-delivered").waitFor();

  // Restart a plugin: its process changes.
  await page.getByRole("link", { name: "Plugins and nodes" }).click();
  await page.getByRole("heading", { name: "Plugins" }).waitFor();
  const pidCell = page.locator("#plugin-webhook .pid");
  const before = (await pidCell.textContent()).trim();
  assert.ok(before, "a running plugin shows its pid");
  await checkPage("plugins");
  await page.getByRole("button", { name: "Restart webhook" }).click();
  await page.getByRole("status").filter({ hasText: "Restart requested" }).waitFor();
  for (let i = 0; ; i++) {
    const now = (await pidCell.textContent()).trim();
    const state = (await page.locator("#plugin-webhook .state").textContent()).trim();
    if (now && now !== before && state === "running") break;
    assert.ok(i < 50, `the plugin was not restarted (pid ${now}, state ${state})`);
    await page.waitForTimeout(200);
    await page.reload();
  }

  // Sign out: the session is gone.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await page.goto(`${base}/ui/addr/${addrId}`);
  assert.match(page.url(), /\/ui\/signin/);
} catch (e) {
  // What the page looked like when it failed.
  await page.screenshot({ path: path.join(shots, "failure.png"), fullPage: true }).catch(() => {});
  console.error(`failed at ${page.url()}:\n${(await page.content().catch(() => "")).slice(0, 20000)}`);
  throw e;
}

await browser.close();
// Chromium logs a page answered with an error status; two are expected:
// the wrong key (403) and the endpoint the plugin refused (400).
const expected = ["status of 403", "status of 400"];
const unexpected = problems.filter((p) => {
  const i = expected.findIndex((e) => p.includes("Failed to load resource") && p.includes(e));
  if (i < 0) return true;
  expected.splice(i, 1);
  return false;
});
assert.deepEqual(unexpected, [], "problems seen in the browser");
console.log("the console walk-through passed");
