// Check the built static site (make book) in headless Chromium.
//
//   node tests/browser/book.check.mjs [SITE_DIR]        (default build/book/html; make book-check)
//
// Serves SITE_DIR on 127.0.0.1 (a free port), opens every page at 1280 x 900 px and checks that
// it loads, that every image shows (naturalWidth > 0), that every local link resolves to a built
// file, that nothing is fetched from outside 127.0.0.1 and that no console or page error appears.
// Then what a reader sees, once MathJax has typeset the page:
//   - maths: no raw "$...$", "\(" or "\[" left in the text outside code (also in <details>),
//     and no MathJax error;
//   - width: no code, output, table, equation or figure needs sideways scrolling or spills out of
//     the page's content area, and the page itself does not scroll sideways;
//   - figures: each is shown at its natural width, or at least FIGURE_MIN_PX wide when larger;
//   - harness: no code cell shows a test-harness comment ("# NBVAL_IGNORE_OUTPUT");
//   - API entries (pages with Python objects): each has a description, each parameter or
//     attribute field names one identifier with a well-formed type, and no description is
//     repeated word for word in another entry (an inherited or generated docstring).
// Saves a screenshot of each page under build/book/screenshots/ (HDN_SCREENSHOT_DIR).
// Exit status 1 if any check fails; PENDING lists known failures that another branch fixes.
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

// At 1280 px the theme's text column is 688 px; notebook cells and wide figures are full-width
// (docs/conf.py), 936 px. A figure wider than this is shown at least this wide.
const FIGURE_MIN_PX = 900;

// Known failures that another branch of the same issue fixes: "page: check" -> why. Such a
// failure is reported as pending; if the check passes, the entry is reported as stale.
const PENDING = {};

const failures = [];
const pending = [];
let passed = 0;
function check(ok, what) {
  if (ok) passed += 1;
  else failures.push(what);
  return ok;
}

/** A check that PENDING may excuse: key is "page: name". */
function checkPending(key, ok, what) {
  if (!(key in PENDING)) return check(ok, what);
  if (ok) {
    pending.push(`STALE (passes now, remove it from PENDING): ${key}`);
    passed += 1;
  } else pending.push(`PENDING: ${what} (${PENDING[key]})`);
  return ok;
}

/** Runs in the page: what a reader sees, after MathJax (see the header). */
async function pageReading(figureMin) {
  if (window.MathJax?.startup?.promise) await window.MathJax.startup.promise.catch(() => {});
  const article = document.querySelector("article.bd-article") || document.querySelector("main .bd-article, main") || document.body;
  const snippet = (text, i = 0) => text.slice(Math.max(0, i - 40), i + 60).replace(/\s+/g, " ").trim();
  const where = (el) => {
    const parts = [];
    for (let e = el; e && e !== article && parts.length < 3; e = e.parentElement) {
      parts.unshift(e.tagName.toLowerCase() + (e.classList.length ? `.${[...e.classList].slice(0, 2).join(".")}` : ""));
    }
    return parts.join(" > ");
  };

  // maths: text outside code, with typeset maths (mjx-container) removed
  const copy = article.cloneNode(true);
  // (signatures hold Python values, e.g. a default label='$\\log_{10}...$', not maths)
  copy.querySelectorAll("pre, code, script, style, textarea, kbd, samp, mjx-container, .highlight, dt.sig").forEach((e) => e.remove());
  const text = copy.textContent;
  const rawMath = [];
  const RAW = /(^|[^\\\w$])\$(?=\S)[^$]*?\S\$(?![\w$])|\$\$|\\\(|\\\[/g;
  for (const m of text.matchAll(RAW)) rawMath.push(snippet(text, m.index));
  const mathErrors = [...article.querySelectorAll("mjx-merror")].map((e) => e.textContent.slice(0, 80));

  // width: scroll boxes whose content is wider than the box, and anything past the content area
  const area = (document.querySelector(".bd-content") || article).getBoundingClientRect();
  const overflow = [];
  for (const el of article.querySelectorAll("*")) {
    // inline maths is measured as its typeset box (mjx-container): MathJax's hidden assistive
    // MathML inside makes every span.math look wider than it is
    if (el.clientWidth === 0 || el.matches("span.math") || el.parentElement.closest("mjx-container")) continue;
    const style = getComputedStyle(el);
    if (el.scrollWidth > el.clientWidth + 1 && ["auto", "scroll", "hidden", "clip"].includes(style.overflowX)) {
      overflow.push(`${where(el)} scrolls (${el.scrollWidth} > ${el.clientWidth} px): ${snippet(el.textContent)}`);
    } else if (el.matches("pre, table, img, mjx-container, div.cell, div.highlight, dl, p")) {
      const r = el.getBoundingClientRect();
      if (r.right > area.right + 1 || r.left < area.left - 1) {
        overflow.push(`${where(el)} spills out of the content area (${Math.round(r.left)}-${Math.round(r.right)} px, area ${Math.round(area.left)}-${Math.round(area.right)}): ${snippet(el.textContent || el.src || "")}`);
      }
    }
  }
  if (document.documentElement.scrollWidth > document.documentElement.clientWidth + 1) {
    overflow.push(`the page scrolls sideways (${document.documentElement.scrollWidth} > ${document.documentElement.clientWidth} px)`);
  }

  // figures
  const small = [];
  for (const img of article.querySelectorAll("img")) {
    if (!img.naturalWidth || img.naturalWidth < 200) continue; // icons, badges
    const shown = img.getBoundingClientRect().width;
    if (shown + 1 < Math.min(img.naturalWidth, figureMin)) {
      small.push(`${(img.currentSrc || img.src).split("/").pop().slice(0, 24)} at ${Math.round(shown)} of ${img.naturalWidth} px`);
    }
  }

  // harness comments in code cells
  const harness = [];
  for (const pre of article.querySelectorAll("div.cell_input pre, div.highlight pre")) {
    for (const line of pre.textContent.split("\n")) {
      if (/^\s*#\s*(NBVAL_[A-Z_]+|PYTEST_VALIDATE_[A-Z_]+)\s*$/.test(line)) harness.push(line.trim());
    }
  }

  // API entries
  const api = { entries: 0, empty: [], fields: [], repeated: [] };
  const seen = new Map();
  for (const dl of article.querySelectorAll("dl.py:not(.field-list)")) {
    const dt = dl.querySelector(":scope > dt");
    const dd = dl.querySelector(":scope > dd");
    if (!dt || !dd) continue;
    api.entries += 1;
    const name = dt.id || dt.textContent.trim().slice(0, 60);
    const own = [...dd.children].filter((c) => !c.matches("dl.py:not(.field-list)"));
    const description = own.map((c) => c.textContent).join(" ").replace(/\s+/g, " ").trim();
    if (!description) api.empty.push(name);
    const first = own.find((c) => c.matches("p"))?.textContent.replace(/\s+/g, " ").trim() || "";
    if (first.length >= 20) {
      if (seen.has(first)) api.repeated.push(`${name} repeats ${seen.get(first)}: ${first.slice(0, 60)}`);
      else seen.set(first, name);
    }
  }
  for (const field of article.querySelectorAll("dl.field-list > dd li > p, dl.field-list > dd > p")) {
    const dt = field.closest("dl.field-list > dd").previousElementSibling;
    const kind = dt ? dt.textContent.replace(/[:\s]+$/, "") : "";
    if (!/^(Parameters|Variables|Attributes|Keyword Arguments|Raises)$/.test(kind)) continue;
    if (!field.firstElementChild?.matches("strong") || field.firstChild !== field.firstElementChild) continue;
    const t = field.textContent.replace(/\s+/g, " ").trim();
    // "name (type) – text", or "name (type)" alone: a parameter that only its annotation describes
    const m = t.match(/^(\S+?)(?: \((.*?)\))? [–—-]+ /) || t.match(/^(\S+?)(?: \((.*)\))?$/);
    const nameOk = m && (kind === "Raises" ? /^[\w.]+$/ : /^\*{0,2}[A-Za-z_]\w*$/).test(m[1]);
    const type = m?.[2];
    const typeOk = type === undefined || !(/[;:]/.test(type) || /,\s*$/.test(type) || /\b(?!or\b|of\b|optional\b)[a-z]{2,}\s+(?!or\b|of\b)[a-z]{2,}\b/.test(type));
    if (!nameOk || !typeOk) api.fields.push(`${kind}: ${t.slice(0, 90)}`);
  }
  return { rawMath, mathErrors, overflow, small, harness, api };
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
  const seen = await page.evaluate(pageReading, FIGURE_MIN_PX);
  check(seen.rawMath.length === 0, `${rel}: no raw maths in the text (${seen.rawMath.length}): ${seen.rawMath.slice(0, 5).join(" | ")}`);
  check(seen.mathErrors.length === 0, `${rel}: no MathJax error: ${seen.mathErrors.join(" | ")}`);
  check(seen.overflow.length === 0, `${rel}: nothing wider than its column (${seen.overflow.length}):\n    ${seen.overflow.slice(0, 8).join("\n    ")}`);
  check(seen.small.length === 0, `${rel}: every figure at its natural width or >= ${FIGURE_MIN_PX} px: ${seen.small.join(", ")}`);
  checkPending(`${rel}: harness`, seen.harness.length === 0, `${rel}: no test-harness comment in code cells: ${seen.harness.join(", ")}`);
  if (seen.api.entries) {
    check(seen.api.empty.length === 0, `${rel}: every API entry has a description; empty: ${seen.api.empty.join(", ")}`);
    check(seen.api.fields.length === 0, `${rel}: every parameter or attribute field names one identifier with a well-formed type:\n    ${seen.api.fields.join("\n    ")}`);
    check(seen.api.repeated.length === 0, `${rel}: no API description repeated in another entry (inherited or generated):\n    ${seen.api.repeated.join("\n    ")}`);
  }
  const shot = path.join(SHOTS, `${rel.replace(/\.html$/, "").replace(/[^A-Za-z0-9._-]+/g, "_")}.png`);
  await page.screenshot({ path: shot });
  return { images: images.length, links: hrefs.length, api: seen.api.entries };
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
  let apiEntries = 0;
  const all = pages();
  try {
    for (const rel of all) {
      const page = await chrome.browser.newPage();
      watchConsole(page, consoleErrors, rel);
      try {
        const r = await checkPage(chrome.browser, base, page, rel, consoleErrors);
        images += r.images;
        links += r.links;
        apiEntries += r.api;
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
  check(apiEntries > 0, `the API entries were found and checked (${apiEntries})`);
  console.log(`${all.length} pages, ${images} images, ${links} links, ${apiEntries} API entries checked; screenshots in ${path.relative(REPO, SHOTS)}`);
  for (const p of pending) console.log(p);
  for (const f of failures) console.log(`FAILED: ${f}`);
  console.log(`${passed} passed, ${failures.length} failed`);
  process.exitCode = failures.length ? 1 : 0;
}

main().catch((err) => {
  console.error(err);
  console.log(`${passed} passed, ${failures.length + 1} failed`);
  process.exit(1);
});
