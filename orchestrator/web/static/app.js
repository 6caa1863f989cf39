// treeplay inspector: runs, learning curves, iterations, preference trees and pairs, read from the
// inspector's JSON API (orchestrator/web/app.py). Plain JS, no libraries, no build step.
//
// Model text is untrusted: it reaches the DOM only as text nodes (h() below turns every string
// child into a text node; nothing here assigns innerHTML), and the server's Content-Security-Policy
// forbids inline script. Unicode bidirectional controls in any string (U+202E RIGHT-TO-LEFT
// OVERRIDE and the like) are shown as visible \u202e marks instead of reordering the text, and
// every element that holds model text is its own bidi island (dir="auto", unicode-bidi: isolate).
//
// Routes (the part of the URL after #):
//   /                 runs
//   /run/ID           learning curves, iterations, trees of a run
//   /run/ID/pairs     the pair browser (?iteration=I&source=S&offset=N)
//   /tree/ID          a tree, children loaded when a node is expanded
//   /node/ID          the tree of node ID, opened down to it, with its details
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const main = () => document.getElementById("main");

// ------------------------------------------------------------------------------------------
// DOM helpers: strings become text nodes, never markup.

// Elements that always hold model text (or JSON of it) get dir="auto" unless told otherwise.
const MODEL_TEXT_TAGS = new Set(["pre", "code"]);

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (MODEL_TEXT_TAGS.has(tag)) el.setAttribute("dir", "auto");
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "className") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  append(el, children);
  return el;
}

// Bidi embeddings, overrides, isolates and marks: invisible characters that change display order.
const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

function bidiMark(ch) {
  return "\\u" + ch.charCodeAt(0).toString(16).padStart(4, "0");
}

// A string as DOM nodes: text, with each bidi control replaced by a visible mark (a styled span in
// HTML; plain text inside SVG, where spans do not render).
function textNodes(text, svg) {
  if (!BIDI_CONTROLS.test(text)) return [document.createTextNode(text)];
  BIDI_CONTROLS.lastIndex = 0;
  if (svg) return [document.createTextNode(text.replace(BIDI_CONTROLS, bidiMark))];
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(BIDI_CONTROLS)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    const mark = document.createElement("span");
    mark.className = "bidi-mark";
    mark.title = "Unicode bidirectional control character, shown instead of applied";
    mark.appendChild(document.createTextNode(bidiMark(m[0])));
    nodes.push(mark);
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function append(el, children) {
  const svg = el.namespaceURI === SVG;
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    if (child instanceof Node) el.appendChild(child);
    else for (const node of textNodes(String(child), svg)) el.appendChild(node);
  }
}

// Replace el's content; like h(), strings become text nodes and null/false/arrays are handled.
function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  return String(v);
}

function shortTime(iso) {
  return iso ? iso.replace("T", " ").slice(0, 19) : "–";
}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.json();
}

function setCrumbs(...links) {
  const nav = document.getElementById("crumbs");
  replace(nav, ...links.map(([text, href]) => (href ? h("a", { href }, text) : h("span", {}, text))));
}

function table(headers, rows, className) {
  return h("table", { className },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

// ------------------------------------------------------------------------------------------
// Runs

async function showRuns() {
  setCrumbs(["runs"]);
  const runs = await api("/api/runs");
  if (!runs.length) {
    replace(main(), h("p", { className: "muted" }, "No runs in this store yet."));
    return;
  }
  replace(main(),
    h("h1", {}, "Runs"),
    table(["id", "name", "status", "iterations", "greedy accuracy", "created", "finished"],
      runs.map((r) => [String(r.id), h("a", { href: `#/run/${r.id}` }, r.name), r.status,
        String(r.iterations), fmt(r.accuracy), shortTime(r.created), shortTime(r.finished)]),
      "runs"));
}

// ------------------------------------------------------------------------------------------
// A run: learning curves (inline SVG), iterations, trees

const CURVES = [
  ["accuracy", /^eval\/.*accuracy/],
  ["reward", /reward|solved|margin/],
  ["loss", /loss/],
];
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function lineChart(title, series) {
  const W = 360, H = 200, L = 44, R = 10, T = 24, B = 28;
  const points = Object.values(series).flat().filter((p) => p[1] !== null);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", class: "chart" });
  svg.appendChild(s("text", { x: L, y: 14, class: "chart-title" }, title));
  if (!points.length) {
    svg.appendChild(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "no data"));
    return svg;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.appendChild(s("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const y of [y0 + pad, (y0 + y1) / 2, y1 - pad]) {
    svg.appendChild(s("text", { x: L - 4, y: Y(y) + 3, "text-anchor": "end", class: "tick" }, String(Number(y.toPrecision(3)))));
    svg.appendChild(s("line", { x1: L, y1: Y(y), x2: W - R, y2: Y(y), class: "grid" }));
  }
  const xs = [...new Set(points.map((p) => p[0]))].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(xs.length / 8));
  xs.filter((_, i) => i % step === 0).forEach((x) =>
    svg.appendChild(s("text", { x: X(x), y: H - B + 14, "text-anchor": "middle", class: "tick" }, String(x))));
  svg.appendChild(s("text", { x: W - R, y: H - 2, "text-anchor": "end", class: "tick" }, "iteration"));
  Object.entries(series).forEach(([name, pts], i) => {
    const color = PALETTE[i % PALETTE.length];
    const good = pts.filter((p) => p[1] !== null);
    svg.appendChild(s("polyline", {
      points: good.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2,
    }));
    for (const p of good) {
      svg.appendChild(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: color },
        s("title", {}, `${name} @ ${p[0]}: ${fmt(p[1], 4)}`)));
    }
  });
  return svg;
}

function legend(series) {
  return h("ul", { className: "legend" }, Object.keys(series).map((name, i) => {
    const swatch = h("span", { className: "swatch" });
    swatch.style.background = PALETTE[i % PALETTE.length];
    return h("li", {}, swatch, name);
  }));
}

function chartBox(title, series) {
  return h("figure", { className: "chart-box" }, lineChart(title, series), legend(series));
}

function curves(metrics) {
  const names = Object.keys(metrics).sort();
  const boxes = [];
  const empty = [];
  for (const [title, pattern] of CURVES) {
    const picked = {};
    names.filter((n) => pattern.test(n) && !/first_loss/.test(n)).slice(0, 6).forEach((n) => { picked[n] = metrics[n]; });
    if (Object.keys(picked).length) boxes.push(chartBox(title, picked));
    else empty.push(title);
  }
  const select = h("select", { "aria-label": "metric" }, names.map((n) => h("option", { value: n }, n)));
  const custom = h("div", { className: "chart-slot" });
  const draw = () => replace(custom, chartBox(select.value, { [select.value]: metrics[select.value] }));
  select.addEventListener("change", draw);
  if (names.length) draw();
  return h("section", {}, h("h2", {}, "Learning curves"),
    empty.length ? h("p", { className: "muted" }, `No ${empty.join(" or ")} metrics were logged for this run.`) : null,
    h("div", { className: "charts" }, boxes, h("div", { className: "chart-any" }, h("label", {}, "any metric ", select), custom)));
}

const ITERATION_COLUMNS = [
  ["greedy acc", "eval/accuracy_greedy"], ["T=1 acc", "eval/accuracy_sample"], ["solved", "rollout/solved"],
  ["nodes", "rollout/nodes"], ["pairs", "rollout/pairs"], ["loss", "learn/loss"], ["reward margin", "learn/reward_margin"],
];

// The weights versions an iteration's data came from: "v3", or "v3:80 v4:48" (a pipelined run).
function dataVersions(it) {
  const found = Object.entries(it.data_versions || {});
  if (found.length === 1 && found[0][0] !== "kept") return `v${found[0][0]}`;
  return found.map(([v, n]) => `${v === "kept" ? "" : "v"}${v}:${n}`).join(" ");
}

function iterationsTable(run) {
  return h("section", {}, h("h2", {}, "Iterations"),
    table(["iter", "status", "version", "data from", "tasks", ...ITERATION_COLUMNS.map((c) => c[0]), "seconds", ""],
      run.iterations.map((it) => [String(it.index), it.status, String(it.policy_version), dataVersions(it), String(it.tasks),
        ...ITERATION_COLUMNS.map((c) => fmt(it.metrics[c[1]])), fmt(it.seconds, 1),
        h("a", { href: `#/run/${run.id}/pairs?iteration=${it.index}` }, "pairs")]),
      "iterations"));
}

async function treesSection(run) {
  const box = h("div", {});
  const select = h("select", { "aria-label": "iteration" }, h("option", { value: "" }, "all iterations"),
    run.iterations.map((it) => h("option", { value: String(it.index) }, `iteration ${it.index}`)));
  let offset = 0;
  const load = async () => {
    const q = new URLSearchParams({ offset: String(offset), limit: "50" });
    if (select.value !== "") q.set("iteration", select.value);
    const page = await api(`/api/runs/${run.id}/trees?${q}`);
    replace(box,
      table(["tree", "iter", "task", "prompt", "nodes", "depth"], page.items.map((t) => [
        h("a", { href: `#/tree/${t.id}` }, `tree ${t.id}`), String(t.iteration), t.task_id,
        h("code", { className: "clip" }, t.prompt), String(t.n_nodes), String(t.max_depth)]), "trees"),
      pager(page, (o) => { offset = o; load(); }));
  };
  select.addEventListener("change", () => { offset = 0; load(); });
  await load();
  return h("section", {}, h("h2", {}, "Trees ", select), box);
}

function pager(page, go) {
  const last = Math.min(page.total, page.offset + page.items.length);
  return h("div", { className: "pager" },
    h("button", { type: "button", disabled: page.offset === 0, onclick: () => go(Math.max(0, page.offset - page.limit)) }, "‹ prev"),
    h("span", {}, `${page.total ? page.offset + 1 : 0}–${last} of ${page.total}`),
    h("button", { type: "button", disabled: last >= page.total, onclick: () => go(page.offset + page.limit) }, "next ›"));
}

async function showRun(id) {
  const run = await api(`/api/runs/${id}`);
  setCrumbs(["runs", "#/"], [`run ${run.name}`]);
  const counts = run.counts || {};
  replace(main(),
    h("h1", {}, `Run ${run.name} `, h("span", { className: `status ${run.status}` }, run.status)),
    h("p", { className: "muted" }, `id ${run.id} · created ${shortTime(run.created)} · finished ${shortTime(run.finished)} · `,
      `${counts.trees ?? 0} trees, ${counts.tree_nodes ?? 0} nodes, ${counts.preference_pairs ?? 0} pairs, `,
      `${counts.judgments ?? 0} judgments · `, h("a", { href: `#/run/${run.id}/pairs` }, "browse pairs")),
    curves(run.metrics), iterationsTable(run), await treesSection(run),
    h("details", {}, h("summary", {}, "config"), h("pre", {}, JSON.stringify(run.config, null, 2))));
}

// ------------------------------------------------------------------------------------------
// Pairs

function nodeLink(id, text) {
  return id === null || id === undefined ? h("span", { className: "muted" }, "no node") : h("a", { href: `#/node/${id}`, className: "node-link" }, text);
}

function pairCard(p) {
  return h("article", { className: "pair", dataset: { pairId: String(p.id) } },
    h("header", {}, h("strong", {}, `pair ${p.id}`), ` · iteration ${fmt(p.iteration)} · ${p.source} · task `,
      h("code", {}, p.task_id ?? "–"), ` · margin ${fmt(p.margin)} · weight ${fmt(p.weight)}`,
      p.label_smoothing ? ` · ε ${fmt(p.label_smoothing)}` : ""),
    h("div", { className: "pair-body" },
      h("div", {}, h("div", { className: "label" }, "prompt"), h("pre", { className: "prompt" }, p.prompt)),
      h("div", {}, h("div", { className: "label chosen" }, "chosen ", nodeLink(p.chosen_node, `node ${p.chosen_node}`),
        p.chosen_visits !== null ? ` N=${p.chosen_visits}` : ""), h("pre", { className: "chosen" }, p.chosen)),
      h("div", {}, h("div", { className: "label rejected" }, "rejected ", nodeLink(p.rejected_node, `node ${p.rejected_node}`),
        p.rejected_visits !== null ? ` N=${p.rejected_visits}` : ""), h("pre", { className: "rejected" }, p.rejected))));
}

async function showPairs(id, params) {
  const run = await api(`/api/runs/${id}`);
  setCrumbs(["runs", "#/"], [`run ${run.name}`, `#/run/${run.id}`], ["pairs"]);
  const iteration = h("select", { "aria-label": "iteration" }, h("option", { value: "" }, "all iterations"),
    run.iterations.map((it) => h("option", { value: String(it.index) }, `iteration ${it.index}`)));
  const source = h("select", { "aria-label": "source" }, h("option", { value: "" }, "all sources"),
    ["mcts", "panel", "credit", "rubric", "slhf", "sample"].map((x) => h("option", { value: x }, x)));
  iteration.value = params.get("iteration") || "";
  source.value = params.get("source") || "";
  const list = h("div", { className: "pairs" });
  let offset = Number(params.get("offset") || 0);
  const load = async () => {
    const q = new URLSearchParams({ offset: String(offset), limit: "25" });
    if (iteration.value) q.set("iteration", iteration.value);
    if (source.value) q.set("source", source.value);
    const page = await api(`/api/runs/${run.id}/pairs?${q}`);
    const go = (o) => { offset = o; load(); };
    replace(list, pager(page, go),
      page.items.length ? page.items.map(pairCard) : h("p", { className: "muted" }, "No pairs match."), pager(page, go));
  };
  for (const sel of [iteration, source]) sel.addEventListener("change", () => { offset = 0; load(); });
  replace(main(), h("h1", {}, `Pairs of run ${run.name}`), h("div", { className: "filters" }, iteration, " ", source), list);
  await load();
}

// ------------------------------------------------------------------------------------------
// Trees: one <li> per node; children fetched from /api/nodes/ID the first time a node is opened.

function qColor(q) {
  const t = Math.max(-1, Math.min(1, q ?? 0));
  return `hsl(${Math.round(60 + 60 * t)}, 70%, ${t === 0 ? 55 : 42}%)`;  // red (-1) .. yellow (0) .. green (+1)
}

function dot(node) {
  const r = Math.min(10, 3 + 2.2 * Math.log2(1 + (node.visits || 0)));
  return s("svg", { width: 22, height: 22, viewBox: "0 0 22 22", class: "dot" },
    s("circle", { cx: 11, cy: 11, r: r.toFixed(1), fill: qColor(node.value) }),
    s("title", {}, `Q=${fmt(node.value)} N=${node.visits}`));
}

function badges(node, isRoot) {
  const out = [];
  if (node.selected && !isRoot) out.push(h("span", { className: "badge selected", title: "on the selected path" }, "●"));
  if (node.chosen) out.push(h("span", { className: "badge chosen", title: `chosen in ${node.chosen} pair(s)` }, "✓ chosen"));
  if (node.rejected) out.push(h("span", { className: "badge rejected", title: `rejected in ${node.rejected} pair(s)` }, "✗ rejected"));
  if (node.terminal) out.push(h("span", { className: `badge ${node.correct ? "right" : "wrong"}` }, node.correct ? "correct" : "wrong"));
  if (node.error) out.push(h("span", { className: "badge error" }, "error"));
  return out;
}

class TreeView {
  constructor(head, onSelect) {
    this.onSelect = onSelect;
    this.items = new Map();   // node id -> {li, childList, loaded, open, node}
    this.selected = null;
    this.root = h("ul", { className: "tree", role: "tree" });
    this.root.appendChild(this.item(head.node, true));
    this.fill(head.node.id, head.children);
  }

  item(node, isRoot = false) {
    const toggle = h("button", { type: "button", className: "toggle", "aria-label": "expand", disabled: !node.n_children },
      node.n_children ? "▸" : "·");
    const label = h("span", { className: "step", dir: "auto" }, isRoot ? "(prompt)" : node.step || "(empty step)");
    const row = h("div", { className: `row${node.selected ? " on-path" : ""}`, dataset: { nodeId: String(node.id) } },
      toggle, dot(node), h("button", { type: "button", className: "label" }, label),
      h("span", { className: "stats" }, `N=${node.visits} Q=${fmt(node.value)} r=${fmt(node.reward)}`),
      badges(node, isRoot), node.n_children ? h("span", { className: "muted count" }, `${node.n_children}`) : null);
    const childList = h("ul", { role: "group" });
    childList.hidden = true;
    const li = h("li", { className: "tree-node", role: "treeitem", dataset: { nodeId: String(node.id) } }, row, childList);
    const entry = { li, row, toggle, childList, loaded: false, open: false, node };
    this.items.set(node.id, entry);
    toggle.addEventListener("click", () => this.setOpen(node.id, !entry.open));
    row.querySelector(".label").addEventListener("click", () => this.select(node.id));
    return li;
  }

  fill(id, children) {
    const entry = this.items.get(id);
    replace(entry.childList, ...children.map((c) => this.item(c)));
    entry.loaded = true;
    this.show(entry, true);
  }

  show(entry, open) {
    entry.open = open;
    entry.childList.hidden = !open;
    entry.toggle.textContent = entry.node.n_children ? (open ? "▾" : "▸") : "·";
    entry.toggle.setAttribute("aria-label", open ? "collapse" : "expand");
    entry.li.setAttribute("aria-expanded", String(open));
  }

  async setOpen(id, open) {
    const entry = this.items.get(id);
    if (open && !entry.loaded) {
      entry.toggle.textContent = "…";
      const data = await api(`/api/nodes/${id}`);
      this.fill(id, data.children);
    } else {
      this.show(entry, open);
    }
  }

  async openPath(ids) {
    for (const id of ids.slice(0, -1)) await this.setOpen(id, true);
  }

  select(id) {
    if (this.selected !== null && this.items.has(this.selected)) this.items.get(this.selected).row.classList.remove("current");
    this.selected = id;
    const entry = this.items.get(id);
    if (entry) {
      entry.row.classList.add("current");
      entry.row.scrollIntoView({ block: "nearest" });
    }
    this.onSelect(id);
  }
}

function statTable(n) {
  return table(["N", "Q", "prior", "reward", "depth", "terminal", "correct", "policy"],
    [[String(n.visits), fmt(n.value), fmt(n.prior), fmt(n.reward), String(n.depth), n.terminal ? "yes" : "no",
      n.correct === null ? "–" : n.correct ? "yes" : "no", `v${n.policy_version}`]], "stats-table");
}

function pairList(title, pairs) {
  if (!pairs.length) return null;
  return h("section", {}, h("h3", {}, `${title} (${pairs.length})`), pairs.map(pairCard));
}

async function renderDetail(box, id) {
  replace(box, h("p", { className: "muted" }, "loading…"));
  const d = await api(`/api/nodes/${id}/detail`);
  const n = d.node;
  replace(box,
    h("h2", {}, `Node ${n.id}`, " ", badges(n, n.parent === null)),
    h("p", { className: "muted" }, `tree ${d.tree.id} · task `, h("code", {}, d.tree.task_id), ` · iteration ${d.tree.iteration}`,
      ` · path ${d.path.join(" › ")}`),
    statTable(n),
    h("h3", {}, "Step"), h("pre", { className: "step-text" }, n.parent === null ? "(the prompt)" : n.step),
    n.observation ? [h("h3", {}, "Observation"), h("pre", {}, n.observation)] : null,
    n.error ? [h("h3", {}, "Error"), h("pre", { className: "error-text" }, n.error)] : null,
    h("h3", {}, "Full text (prompt and steps to here)"), h("pre", { className: "fulltext" }, d.text),
    d.rubric ? [h("h3", {}, "Rubric"), h("pre", { className: "rubric" }, typeof d.rubric === "string" ? d.rubric : JSON.stringify(d.rubric, null, 2))] : null,
    d.judgments.length ? h("section", {}, h("h3", {}, `Judgments (${d.judgments.length})`),
      table(["judge", "score", "rationale"], d.judgments.map((j) => [j.judge, fmt(j.score), h("span", { className: "pre-line", dir: "auto" }, j.rationale)]), "judgments"))
      : h("p", { className: "muted" }, "No judgments of this node."),
    pairList("Pairs made among its children", d.child_pairs),
    pairList("Pairs it is part of", d.pairs),
    h("details", {}, h("summary", {}, "info"), h("pre", {}, JSON.stringify(n.info, null, 2))));
}

async function showTree(treeId, focusNode) {
  const head = await api(`/api/trees/${treeId}`);
  const t = head.tree;
  setCrumbs(["runs", "#/"], [`run ${t.run_id}`, `#/run/${t.run_id}`], [`tree ${t.id}`]);
  const detail = h("aside", { id: "detail", className: "detail" }, h("p", { className: "muted" }, "Click a step to see its details."));
  const view = new TreeView(head, (id) => renderDetail(detail, id).catch((e) => replace(detail, errorBox(e))));
  const expandAll = h("button", { type: "button", onclick: () => expandLevels(view, 2) }, "expand 2 levels");
  replace(main(),
    h("h1", {}, `Tree ${t.id} `, h("span", { className: "muted small" }, `iteration ${t.iteration} · ${t.n_nodes} nodes · depth ${t.max_depth}`)),
    h("pre", { className: "prompt" }, t.prompt),
    h("p", { className: "legend-line muted" }, "colour = Q (red −1 … green +1) · size = visits N · ● selected path · ",
      "✓/✗ chosen/rejected side of a pair · ", expandAll),
    h("div", { className: "tree-layout" }, h("div", { className: "tree-pane" }, view.root), detail));
  if (focusNode !== undefined) {
    const path = (await api(`/api/nodes/${focusNode}/detail`)).path;
    await view.openPath(path);
    view.select(focusNode);
  }
}

async function expandLevels(view, levels) {
  let frontier = [...view.items.values()].filter((e) => e.open || e.node.parent === null).map((e) => e.node.id);
  for (let i = 0; i < levels; i++) {
    const next = [];
    for (const id of frontier) {
      const entry = view.items.get(id);
      if (!entry.node.n_children) continue;
      await view.setOpen(id, true);
      next.push(...[...entry.childList.children].map((li) => Number(li.dataset.nodeId)));
    }
    frontier = next;
  }
}

async function showNode(nodeId) {
  const d = await api(`/api/nodes/${nodeId}`);
  await showTree(d.tree_id, Number(nodeId));
}

// ------------------------------------------------------------------------------------------
// Routing

function errorBox(e) {
  return h("p", { className: "error-text" }, `Could not load: ${e.message}`);
}

async function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.body.dataset.ready = "0";
  try {
    if (parts[0] === "run" && parts[2] === "pairs") await showPairs(parts[1], params);
    else if (parts[0] === "run") await showRun(parts[1]);
    else if (parts[0] === "tree") await showTree(parts[1], params.has("node") ? Number(params.get("node")) : undefined);
    else if (parts[0] === "node") await showNode(parts[1]);
    else await showRuns();
  } catch (e) {
    replace(main(), errorBox(e));
  }
  document.body.dataset.ready = "1";
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", route);
