// A page the console did not make (a public file, a plugin's page), opened
// in a real Chromium by an operator signed in to the console, cannot act
// as the console: code run in it cannot read a console page. Its own
// script runs or not as its sandbox says: the title it has once loaded is
// PAGE_TITLE. Run by tests/tests/console.rs.
//
// Environment: ROBOGER_URL, ROBOGER_KEY, PAGE_PATH (the page's path),
// PAGE_TITLE, and browser.mjs's.
import assert from "node:assert/strict";
import { env, launch } from "./browser.mjs";

const base = env("ROBOGER_URL");
const browser = await launch();
try {
  const page = await (await browser.newContext()).newPage();
  page.setDefaultTimeout(15000);
  await page.goto(`${base}/ui/signin?next=/ui/addr`);
  await page.getByLabel("Master key").fill(env("ROBOGER_KEY"));
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: /^Addresses/ }).waitFor();

  await page.goto(`${base}${env("PAGE_PATH")}`);
  assert.equal(await page.title(), env("PAGE_TITLE"), "the page's own script");
  const read = await page.evaluate(async () => {
    try {
      const r = await fetch("/ui/addr");
      const text = await r.text();
      return `read ${r.status}${text.includes('name="csrf"') ? ", with a CSRF token" : ""}`;
    } catch (e) {
      return `refused (${e})`;
    }
  });
  assert.match(read, /^refused/, "code in the page read the console");
  console.log(`the page was kept from the console: ${read}`);
} finally {
  await browser.close();
}
