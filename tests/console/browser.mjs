// What the browser scripts share: the environment they are given, and
// Debian's Chromium launched through playwright-core, headless.
//
// Environment: PLAYWRIGHT_DIR (where npm installed playwright-core),
// CHROMIUM (the browser's executable).
import { createRequire } from "node:module";
import path from "node:path";

/** The environment variable `k`, which must be set. */
export const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};

/** Chromium, headless, with nothing of its own on the network. */
export async function launch() {
  const require = createRequire(path.join(env("PLAYWRIGHT_DIR"), "noop.js"));
  const { chromium } = require("playwright-core");
  return chromium.launch({
    executablePath: env("CHROMIUM"),
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
}
