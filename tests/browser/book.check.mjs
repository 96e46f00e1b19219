// Check the built static site (make book) in headless Chromium.
//
//   node tests/browser/book.check.mjs [SITE_DIR]        (default build/book/html; make book-check)
//
// Serves SITE_DIR on 127.0.0.1 (a free port), opens every page and checks that it loads, that
// every image shows (naturalWidth > 0), that every local link resolves to a built file, that
// nothing is fetched from outside 127.0.0.1 and that no console or page error appears. Saves a
// screenshot of each page under build/book/screenshots/ (HDN_SCREENSHOT_DIR).
import { createReadStream, existsSync, mkdirSync, readdirSync, statSync } from "node:fs";
import http from "node:http";
import path from "node:path";

import { REPO, freePort, launchChromium, watchConsole } from "./common.mjs";

const SITE = path.resolve(process.argv[2] || path.join(REPO, "build", "book", "html"));
const SHOTS = path.resolve(process.env.HDN_SCREENSHOT_DIR || path.join(SITE, "..", "screenshots"));
const TYPES = {
  ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".png": "image/png", ".jpg": "image/jpeg", ".svg": "image/svg+xml", ".json": "application/json",
  ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".ico": "image/x-icon", ".txt": "text/plain",
  ".ipynb": "application/json", ".inv": "application/octet-stream",
};

const failures = [];
let passed = 0;
function check(ok, what) {
  if (ok) passed += 1;
  else failures.push(what);
  return ok;
}

/** The built file a site path names (a folder names its index.html), or null. */
function fileFor(urlPath) {
  let p = path.join(SITE, decodeURIComponent(urlPath.split("?")[0]));
  if (!p.startsWith(SITE)) return null;
  if (existsSync(p) && statSync(p).isDirectory()) p = path.join(p, "index.html");
  return existsSync(p) && statSync(p).isFile() ? p : null;
}

function serve(port) {
  const server = http.createServer((req, res) => {
    const file = fileFor(new URL(req.url, "http://x").pathname);
    if (!file) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "Content-Type": TYPES[path.extname(file)] || "application/octet-stream" });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

function pages(dir = SITE) {
  const out = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (!["_static", "_sources", "_images", "_downloads"].includes(entry.name)) out.push(...pages(p));
    } else if (entry.name.endsWith(".html")) out.push(path.relative(SITE, p).split(path.sep).join("/"));
  }
  return out.sort();
}

async function checkPage(browser, base, page, rel, consoleErrors) {
  const outside = [];
  await page.route("**/*", (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === "data:" || url.hostname === "127.0.0.1") return route.continue();
    outside.push(url.href);
    return route.abort();
  });
  const response = await page.goto(`${base}/${rel}`, { waitUntil: "load", timeout: 60000 });
  check(response && response.ok(), `${rel}: loads (HTTP ${response && response.status()})`);
  await page.waitForLoadState("networkidle", { timeout: 30000 }).catch(() => {});
  const images = await page.evaluate(async () => {
    const imgs = [...document.images];
    for (const img of imgs) img.loading = "eager";
    await Promise.all(imgs.map((img) => img.decode().catch(() => {})));
    return imgs.map((img) => ({ src: img.currentSrc || img.src, width: img.naturalWidth }));
  });
  const broken = images.filter((i) => !(i.width > 0));
  check(broken.length === 0, `${rel}: every image shows (${images.length}); broken: ${broken.map((i) => i.src.slice(0, 100)).join(", ")}`);
  const hrefs = await page.evaluate(() => [...document.querySelectorAll("a[href]")].map((a) => a.href));
  const missing = new Set();
  for (const href of hrefs) {
    const url = new URL(href);
    if (url.origin !== base) continue;
    if (!fileFor(url.pathname)) missing.add(url.pathname);
  }
  check(missing.size === 0, `${rel}: every local link resolves to a built file; missing: ${[...missing].join(", ")}`);
  check(outside.length === 0, `${rel}: nothing fetched from outside the site: ${outside.join(", ")}`);
  const shot = path.join(SHOTS, `${rel.replace(/\.html$/, "").replace(/[^A-Za-z0-9._-]+/g, "_")}.png`);
  await page.screenshot({ path: shot });
  return { images: images.length, links: hrefs.length };
}

async function main() {
  if (!existsSync(path.join(SITE, "index.html"))) throw new Error(`no site at ${SITE} (run make book)`);
  mkdirSync(SHOTS, { recursive: true });
  const port = await freePort();
  const server = await serve(port);
  const base = `http://127.0.0.1:${port}`;
  const chrome = await launchChromium({ viewport: { width: 1280, height: 900 } });
  const consoleErrors = [];
  let images = 0;
  let links = 0;
  const all = pages();
  try {
    for (const rel of all) {
      const page = await chrome.browser.newPage();
      watchConsole(page, consoleErrors, rel);
      try {
        const r = await checkPage(chrome.browser, base, page, rel, consoleErrors);
        images += r.images;
        links += r.links;
      } catch (err) {
        check(false, `${rel}: ${err.message}`);
      } finally {
        await page.close().catch(() => {});
      }
    }
  } finally {
    await chrome.close();
    server.close();
  }
  check(consoleErrors.length === 0, `no console or page errors:\n  ${consoleErrors.join("\n  ")}`);
  console.log(`${all.length} pages, ${images} images, ${links} links checked; screenshots in ${path.relative(REPO, SHOTS)}`);
  for (const f of failures) console.log(`FAILED: ${f}`);
  console.log(`${passed} passed, ${failures.length} failed`);
  process.exitCode = failures.length ? 1 : 0;
}

main().catch((err) => {
  console.error(err);
  console.log(`${passed} passed, ${failures.length + 1} failed`);
  process.exit(1);
});
