// A public file, opened in a real Chromium by an operator signed in to the
// console, cannot act as the console: its own script does not run, and
// code run in its page cannot read a console page. Run by
// tests/tests/console.rs, which has a plugin store the file (an HTML page
// whose script would set its title).
//
// Environment: ROBOGER_URL, ROBOGER_KEY, FILE_PATH (the file's path), and
// browser.mjs's.
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

  await page.goto(`${base}${env("FILE_PATH")}`);
  assert.equal(await page.title(), "a pushed page", "the file's own script ran");
  const read = await page.evaluate(async () => {
    try {
      const r = await fetch("/ui/addr");
      const text = await r.text();
      return `read ${r.status}${text.includes('name="csrf"') ? ", with a CSRF token" : ""}`;
    } catch (e) {
      return `refused (${e})`;
    }
  });
  assert.match(read, /^refused/, "code in the file's page read the console");
  console.log(`the public file was kept from the console: ${read}`);
} finally {
  await browser.close();
}
