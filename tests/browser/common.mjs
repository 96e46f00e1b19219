// Shared helpers of the browser checks: Debian's Chromium through playwright-core (no browser
// download), free ports, a small results table, the closing "N passed, N failed" line.
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, "..", "..");
export const CHROMIUM = process.env.HDN_CHROMIUM || "/usr/bin/chromium";

/** Launch headless Debian Chromium with a fresh profile (--user-data-dir); returns { browser, close },
 *  where browser is a BrowserContext (newPage()). */
export async function launchChromium(options = {}) {
  const profile = mkdtempSync(path.join(os.tmpdir(), "hdn-chromium-"));
  const browser = await chromium.launchPersistentContext(profile, {
    ...options,
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const close = async () => {
    await browser.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { browser, close };
}

/** A TCP port on 127.0.0.1 that is free right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Collect console errors and uncaught page errors of a page into `sink` (strings). */
export function watchConsole(page, sink, label) {
  page.on("console", (msg) => {
    if (msg.type() === "error") sink.push(`${label}: console error: ${msg.text()}`);
  });
  page.on("pageerror", (err) => sink.push(`${label}: page error: ${err.message}`));
}

/** Plain text table: rows of arrays, first row the header. */
export function table(rows) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => String(r[i]).length)));
  const line = (r) => r.map((c, i) => String(c).padEnd(widths[i])).join("  ").trimEnd();
  return [line(rows[0]), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

/** Markdown table of the same rows. */
export function markdownTable(rows) {
  const line = (r) => `| ${r.join(" | ")} |`;
  return [line(rows[0]), line(rows[0].map(() => "---")), ...rows.slice(1).map(line)].join("\n");
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function median(values) {
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
