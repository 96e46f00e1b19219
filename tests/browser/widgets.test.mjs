// End-to-end test of the workbook's widgets in JupyterLab and headless Chromium.
//
//   node tests/browser/widgets.test.mjs [NN ...]      (make test-browser runs it)
//
// Starts JupyterLab on 127.0.0.1 (a free port, a random token, no browser of its own) over a
// temporary copy of notebooks/ (so nothing can save into the repository's notebooks), opens
// each notebook that shows a widget (or the notebooks whose numbers are given), runs all its
// cells, then moves every control of every widget (dropdowns, sliders, toggles) and checks
// that the widget's image changed and that no error appeared: no error output in the
// notebook, no error or stderr message from the kernel while the controls move, no console
// or page error. Each redraw (control changed -> new image decoded in the page) is timed;
// the times are printed as a table and written to build/browser/redraw_times.{json,md},
// with a screenshot of every widget. JupyterLab is stopped at the end, also on failure.
//
// Environment: HDN_PYTHON (python with jupyterlab and hdn's dependencies; default python3),
// HDN_CHROMIUM (default /usr/bin/chromium), HDN_BUILD_DIR (default build/browser),
// HDN_NOTEBOOK_TIMEOUT_S (running one notebook, default 420).
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";

import { REPO, freePort, launchChromium, markdownTable, median, sleep, table, watchConsole } from "./common.mjs";

const PYTHON = process.env.HDN_PYTHON || "python3";
const OUT = path.resolve(process.env.HDN_BUILD_DIR || path.join(REPO, "build", "browser"));
const NOTEBOOK_TIMEOUT_MS = 1000 * Number(process.env.HDN_NOTEBOOK_TIMEOUT_S || 420);
const REDRAW_TIMEOUT_MS = 30000;
const MOVES_PER_CONTROL = 2;
const WIDGET_MIME = "application/vnd.jupyter.widget-view+json";

const failures = [];
let passed = 0;
function check(ok, what) {
  if (ok) passed += 1;
  else failures.push(what);
  return ok;
}

/** Notebooks whose stored outputs show a widget, or those named by number on the command line. */
function notebooksToRun() {
  const dir = path.join(REPO, "notebooks");
  const all = readdirSync(dir).filter((f) => f.endsWith(".ipynb")).sort();
  const wanted = process.argv.slice(2);
  if (wanted.length) return all.filter((f) => wanted.some((w) => f.startsWith(w)));
  return all.filter((f) => readFileSync(path.join(dir, f), "utf8").includes(WIDGET_MIME));
}

/** A scratch tree laid out as the repository that `make lab` serves: notebooks/ (copies), data/
 *  and docs/ (links to the repository's, so that the notebooks' links resolve), Jupyter's dirs. */
function scratchTree() {
  const root = mkdtempSync(path.join(os.tmpdir(), "hdn-lab-"));
  const work = path.join(root, "work");
  mkdirSync(path.join(work, "notebooks"), { recursive: true });
  for (const f of readdirSync(path.join(REPO, "notebooks")).filter((f) => f.endsWith(".ipynb"))) {
    cpSync(path.join(REPO, "notebooks", f), path.join(work, "notebooks", f));
  }
  symlinkSync(path.join(REPO, "data"), path.join(work, "data"));
  symlinkSync(path.join(REPO, "docs"), path.join(work, "docs"));
  const settings = path.join(root, "settings");
  const override = (plugin, values) => {
    const file = path.join(settings, ...plugin.split("/").slice(0, -1), `${plugin.split("/").pop()}.jupyterlab-settings`);
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, JSON.stringify(values));
  };
  override("@jupyterlab/docmanager-extension/plugin", { autosave: false });
  override("@jupyterlab/apputils-extension/notification", { fetchNews: "false", checkForUpdates: false });
  for (const d of ["config", "data", "runtime", "workspaces"]) mkdirSync(path.join(root, d), { recursive: true });
  return { root, work, settings };
}

async function startLab(tree) {
  const port = await freePort();
  const token = randomBytes(24).toString("hex");
  const env = {
    ...process.env,
    PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter),
    JUPYTER_CONFIG_DIR: path.join(tree.root, "config"),
    JUPYTER_RUNTIME_DIR: path.join(tree.root, "runtime"),
    JUPYTERLAB_SETTINGS_DIR: tree.settings,
    JUPYTERLAB_WORKSPACES_DIR: path.join(tree.root, "workspaces"),
    MPLBACKEND: "module://matplotlib_inline.backend_inline",
  };
  const args = [
    "-m", "jupyter", "lab", "--no-browser", "--expose-app-in-browser",
    "--ServerApp.ip=127.0.0.1", `--ServerApp.port=${port}`, "--ServerApp.port_retries=0",
    `--IdentityProvider.token=${token}`, `--ServerApp.root_dir=${tree.work}`,
    "--allow-root", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
  ];
  const log = [];
  const proc = spawn(PYTHON, args, { env, detached: true, stdio: ["ignore", "pipe", "pipe"] });
  for (const stream of [proc.stdout, proc.stderr]) stream.on("data", (d) => log.push(String(d)));
  const base = `http://127.0.0.1:${port}`;
  const stop = async () => {
    if (proc.exitCode !== null) return;
    await fetch(`${base}/api/shutdown`, { method: "POST", headers: { Authorization: `token ${token}` } }).catch(() => {});
    for (let i = 0; i < 50 && proc.exitCode === null; i++) await sleep(100);
    for (const signal of ["SIGTERM", "SIGKILL"]) {
      if (proc.exitCode !== null) break;
      try {
        process.kill(-proc.pid, signal); // the server and its kernels
      } catch {}
      for (let i = 0; i < 30 && proc.exitCode === null; i++) await sleep(100);
    }
  };
  const deadline = Date.now() + 90000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`JupyterLab exited (${proc.exitCode}):\n${log.join("")}`);
    try {
      const r = await fetch(`${base}/api/status`, { headers: { Authorization: `token ${token}` } });
      if (r.ok) return { base, token, stop, log };
    } catch {}
    await sleep(300);
  }
  await stop();
  throw new Error(`JupyterLab did not answer within 90 s:\n${log.join("")}`);
}

async function shutdownKernels(lab) {
  const headers = { Authorization: `token ${lab.token}` };
  const sessions = await (await fetch(`${lab.base}/api/sessions`, { headers })).json();
  for (const s of sessions) await fetch(`${lab.base}/api/sessions/${s.id}`, { method: "DELETE", headers });
}

// --- in the page ----------------------------------------------------------------------------

/** Runs in the page: hooks kernel messages and returns when the notebook is ready. */
async function pageOpen() {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  await panel.context.ready;
  await panel.sessionContext.ready;
  window.__hdn = { kernelErrors: [], recording: false };
  panel.sessionContext.iopubMessage.connect((_, msg) => {
    const type = msg.header.msg_type;
    const c = msg.content || {};
    if (type === "error") window.__hdn.kernelErrors.push({ during: window.__hdn.recording, text: `${c.ename}: ${c.evalue}` });
    if (type === "stream" && c.name === "stderr" && window.__hdn.recording) {
      window.__hdn.kernelErrors.push({ during: true, text: `stderr: ${c.text}` });
    }
  });
  return panel.title.label;
}

/** Runs in the page: state of the run ({done, error, cells, executed}). */
function pageRunState() {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.model.cells;
  let code = 0;
  let executed = 0;
  let error = null;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== "code") continue;
    code += 1;
    if (cell.executionCount !== null && cell.executionCount !== undefined) executed += 1;
    const outputs = cell.outputs.toJSON();
    for (const o of outputs) if (o.output_type === "error" && !error) error = `cell ${i}: ${o.ename}: ${o.evalue}`;
  }
  const kernel = panel.sessionContext.session?.kernel;
  const busy = !kernel || kernel.status !== "idle" || document.querySelector(".jp-InputArea-prompt")?.textContent === "[*]:";
  const running = [...document.querySelectorAll(".jp-InputArea-prompt")].some((p) => p.textContent.includes("*"));
  return { done: executed === code && !busy && !running, error, code, executed };
}

/** Runs in the page: tags the widget roots and their controls; returns their description. */
function pageFindWidgets() {
  const roots = [...document.querySelectorAll(".jp-OutputArea-output .widget-vbox, .jp-OutputArea-output .widget-hbox")]
    .filter((el) => !el.parentElement.closest(".widget-vbox, .widget-hbox"));
  return roots.map((root, w) => {
    root.dataset.hdnWidget = String(w);
    const controls = [...root.querySelectorAll(".widget-dropdown, .widget-slider, .widget-toggle-button, .widget-checkbox, .widget-toggle-buttons")];
    return {
      controls: controls.map((el, c) => {
        el.dataset.hdnControl = `${w}-${c}`;
        const kind = el.classList.contains("widget-dropdown") ? "dropdown"
          : el.classList.contains("widget-slider") ? "slider"
          : el.classList.contains("widget-checkbox") ? "checkbox"
          : el.classList.contains("widget-toggle-buttons") ? "toggle-buttons" : "toggle";
        const label = el.querySelector(".widget-label")?.textContent?.trim() || el.textContent.trim().slice(0, 20);
        return { kind, label };
      }),
      hasImage: Boolean(root.querySelector(".widget-output img")),
    };
  });
}

/** Runs in the page: the widget's image src and the control's current value. */
function pageState([w, c]) {
  const root = document.querySelector(`[data-hdn-widget="${w}"]`);
  const el = document.querySelector(`[data-hdn-control="${w}-${c}"]`);
  const img = root.querySelector(".widget-output img");
  let value = null;
  let disabled = false;
  const select = el.querySelector("select");
  const handle = el.querySelector(".noUi-handle");
  if (select) {
    value = select.value;
    disabled = select.disabled;
  } else if (handle) {
    value = Number(handle.getAttribute("aria-valuenow"));
    disabled = el.querySelector(".noUi-target")?.hasAttribute("disabled") || el.classList.contains("mod-disabled");
  } else {
    const input = el.matches("button") ? el : el.querySelector("input, button");
    value = input?.checked ?? input?.classList.contains("mod-active");
    disabled = input?.disabled;
  }
  return { src: img ? img.src : null, value, disabled };
}

/** Runs in the page: start waiting for a new image; returns performance.now() at the start. */
function pageArm([w, oldSrc, timeoutMs]) {
  const out = document.querySelector(`[data-hdn-widget="${w}"] .widget-output`);
  window.__hdn.recording = true;
  window.__hdn.pending = new Promise((resolve) => {
    let done = false;
    const finish = (result) => {
      if (done) return;
      done = true;
      observer.disconnect();
      resolve(result);
    };
    const look = () => {
      const img = out.querySelector("img");
      if (!img || img.src === oldSrc || img.dataset.hdnSeen) return;
      img.dataset.hdnSeen = "1";
      img.decode().then(
        () => finish({ t: performance.now(), src: img.src, width: img.naturalWidth }),
        () => finish({ t: performance.now(), src: img.src, width: 0 }),
      );
    };
    const observer = new MutationObserver(look);
    observer.observe(out, { subtree: true, childList: true, attributes: true, attributeFilter: ["src"] });
    setTimeout(() => finish({ t: null }), timeoutMs);
  });
  return performance.now();
}

// --- moving controls ------------------------------------------------------------------------

async function move(page, control, kind, value) {
  const el = page.locator(`[data-hdn-control="${control}"]`);
  if (kind === "dropdown") {
    const select = el.locator("select");
    const options = await select.locator("option").evaluateAll((os) => os.map((o) => o.value));
    const next = options[(options.indexOf(value) + 1) % options.length];
    await select.selectOption(next);
    return next;
  }
  if (kind === "slider") {
    const handle = el.locator(".noUi-handle").first();
    const max = Number(await handle.getAttribute("aria-valuemax"));
    const key = value >= max ? "ArrowLeft" : "ArrowRight";
    await handle.focus();
    await handle.press(key);
    return key === "ArrowLeft" ? value - 1 : value + 1;
  }
  const target = el.locator("input, button").first();
  await (kind === "checkbox" ? target.click() : el.locator("button").last().click());
  return "toggled";
}

async function exerciseWidgets(page, name, results) {
  const widgets = await page.evaluate(pageFindWidgets);
  const expected = await page.evaluate((mime) => {
    const cells = window.jupyterapp.shell.currentWidget.model.cells;
    let n = 0;
    for (let i = 0; i < cells.length; i++) {
      const cell = cells.get(i);
      if (cell.type === "code") n += cell.outputs.toJSON().filter((o) => o.data && o.data[mime]).length;
    }
    return n;
  }, WIDGET_MIME);
  check(widgets.length >= expected && expected > 0, `${name}: ${widgets.length} widget views shown for ${expected} widget outputs`);
  for (const [w, widget] of widgets.entries()) {
    if (!check(widget.hasImage, `${name}: widget ${w} shows an image`)) continue;
    check(widget.controls.length > 0, `${name}: widget ${w} has controls`);
    for (const [c, control] of widget.controls.entries()) {
      for (let m = 0; m < MOVES_PER_CONTROL; m++) {
        const before = await page.evaluate(pageState, [w, c]);
        if (before.disabled) {
          results.push({ notebook: name, widget: w, control: control.label, move: m + 1, from: before.value, to: "(disabled)", ms: null });
          continue;
        }
        const t0 = await page.evaluate(pageArm, [w, before.src, REDRAW_TIMEOUT_MS]);
        const to = await move(page, `${w}-${c}`, control.kind, before.value);
        const shown = await page.evaluate(() => window.__hdn.pending);
        const what = `${name}: widget ${w}, ${control.label} ${before.value} -> ${to}`;
        const ms = shown.t === null ? null : shown.t - t0;
        results.push({ notebook: name, widget: w, control: control.label, move: m + 1, from: before.value, to, ms });
        check(shown.t !== null, `${what}: a new image within ${REDRAW_TIMEOUT_MS / 1000} s`);
        if (shown.t !== null) {
          check(shown.src !== before.src && shown.width > 0, `${what}: the image changed and shows`);
        }
      }
    }
    await page.locator(`[data-hdn-widget="${w}"]`).screenshot({ path: path.join(OUT, `${name.replace(/\.ipynb$/, "")}_widget${w}.png`) });
  }
  const kernelErrors = await page.evaluate(() => window.__hdn.kernelErrors.filter((e) => e.during).map((e) => e.text));
  check(kernelErrors.length === 0, `${name}: no kernel error or stderr while the controls moved: ${kernelErrors.join(" | ")}`);
}

async function runNotebook(browser, lab, file, results, consoleErrors) {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  watchConsole(page, consoleErrors, file);
  const started = Date.now();
  try {
    await page.goto(`${lab.base}/lab/tree/notebooks/${file}?reset&token=${lab.token}`);
    await page.waitForFunction(
      (f) => window.jupyterapp?.shell?.currentWidget?.title?.label === f,
      file,
      { timeout: 90000 },
    );
    await page.evaluate(pageOpen);
    await page.evaluate(() => window.jupyterapp.commands.execute("notebook:run-all-cells"));
    let state;
    while (true) {
      await sleep(1000);
      state = await page.evaluate(pageRunState);
      if (state.error || state.done) break;
      if (Date.now() - started > NOTEBOOK_TIMEOUT_MS) break;
    }
    const runS = (Date.now() - started) / 1000;
    console.log(`${file}: ran ${state.executed}/${state.code} code cells in ${runS.toFixed(0)} s`);
    check(!state.error, `${file}: no error output (${state.error})`);
    if (!check(state.done, `${file}: all cells ran within ${NOTEBOOK_TIMEOUT_MS / 1000} s`)) return runS;
    await page.waitForFunction(() => document.querySelectorAll(".jp-OutputArea-output .widget-output img").length > 0, null, { timeout: 60000 })
      .catch(() => {});
    await exerciseWidgets(page, file, results);
    return runS;
  } finally {
    await page.close().catch(() => {});
    await shutdownKernels(lab).catch(() => {});
  }
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const notebooks = notebooksToRun();
  if (!notebooks.length) throw new Error("no notebook with a widget found");
  const tree = scratchTree();
  let lab = null;
  let chrome = null;
  const results = [];
  const consoleErrors = [];
  const runTimes = {};
  const stopAll = async () => {
    if (chrome) await chrome.close();
    if (lab) await lab.stop();
    rmSync(tree.root, { recursive: true, force: true });
  };
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.on(signal, () => stopAll().finally(() => process.exit(130)));
  }
  try {
    lab = await startLab(tree);
    chrome = await launchChromium();
    for (const file of notebooks) {
      try {
        runTimes[file] = await runNotebook(chrome.browser, lab, file, results, consoleErrors);
      } catch (err) {
        check(false, `${file}: ${err.message}`);
      }
    }
  } finally {
    await stopAll();
  }
  check(consoleErrors.length === 0, `no console or page errors:\n  ${consoleErrors.join("\n  ")}`);

  const rows = [["notebook", "widget", "control", "move", "from", "to", "redraw (ms)"]];
  for (const r of results) rows.push([r.notebook, r.widget, r.control, r.move, r.from, r.to, r.ms === null ? "-" : r.ms.toFixed(0)]);
  const summary = [["notebook", "control", "redraws", "median (ms)", "max (ms)"]];
  const groups = new Map();
  for (const r of results.filter((r) => r.ms !== null)) {
    const key = `${r.notebook}\u0000${r.control}`;
    groups.set(key, [...(groups.get(key) || []), r.ms]);
  }
  for (const [key, ms] of groups) {
    const [nb, control] = key.split("\u0000");
    summary.push([nb, control, ms.length, median(ms).toFixed(0), Math.max(...ms).toFixed(0)]);
  }
  console.log(`\nRedraw times (control changed -> new image decoded), ${os.cpus().length} CPUs:\n`);
  console.log(table(rows));
  console.log(`\n${table(summary)}\n`);
  writeFileSync(path.join(OUT, "redraw_times.json"), JSON.stringify({ cpus: os.cpus().length, notebookRunSeconds: runTimes, redraws: results }, null, 2));
  writeFileSync(
    path.join(OUT, "redraw_times.md"),
    `# Widget redraw times\n\n${os.cpus().length} CPUs. Control changed -> new image decoded in Chromium.\n\n${markdownTable(summary)}\n\n## Every redraw\n\n${markdownTable(rows)}\n`,
  );
  console.log(`times and screenshots in ${path.relative(REPO, OUT) || OUT}`);
  for (const f of failures) console.log(`FAILED: ${f}`);
  console.log(`${passed} passed, ${failures.length} failed`);
  process.exitCode = failures.length ? 1 : 0;
}

main().catch((err) => {
  console.error(err);
  console.log(`${passed} passed, ${failures.length + 1} failed`);
  process.exit(1);
});
