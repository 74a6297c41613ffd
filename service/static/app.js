// lookalike's web page: drop an image, scroll forever, and let how long you look steer the feed.
// Talks only to the public HTTP API v1 (ARCHITECTURE.md section 6). No build step, no framework.

const CONFIG = Object.freeze({
  visibleRatio: 0.5, // a look counts while at least half of the image is on screen
  idleMs: 30_000, // no input for this long: the viewer has walked away, dwell pauses
  batchSize: 10, // feedback is sent once this many events wait...
  flushMs: 4_000, // ...or this often
  maxRetries: 3,
  prefetchPx: 1200, // the next page is fetched this far before the end of the feed
  generatingPollMs: 1_500,
  minColumnPx: 220,
  gapPx: 12,
});

const $ = (selector) => document.querySelector(selector);
const now = () => performance.now();

// ---------------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  get retryable() {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

async function api(path, { method = "GET", json, form, keepalive = false } = {}) {
  const init = { method, headers: { Accept: "application/json" }, keepalive };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Is it still running?");
  }
  if (response.status === 204) return null;
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body?.error ?? {};
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    throw new ApiError(response.status, error.code ?? `http_${response.status}`,
      error.message ?? response.statusText, retryAfter);
  }
  return body;
}

// crypto.randomUUID exists only in secure contexts; a LAN address over plain http is not one.
function uuid() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---------------------------------------------------------------------------------- dwell

/**
 * Dwell per tile, as viewability analytics measure it: time with >= 50 % of the image on screen
 * (or half the viewport, for images taller than two screens), image loaded, tab visible and
 * focused, and some input in the last 30 s. One look = one event, reported when it ends.
 */
class DwellTracker {
  constructor(report) {
    this.report = report; // (sessionId, imageId, dwellMs) => void
    this.tiles = new Map(); // element -> {id, session, inView, loaded, since, acc}
    this.lastInput = now();
    this.idle = false;
    this.only = null; // while the viewer is open only its image is being looked at
    const bar = document.querySelector(".bar")?.offsetHeight ?? 0; // the sticky bar hides what is under it
    this.observer = new IntersectionObserver((entries) => this.onIntersect(entries), {
      threshold: [0, 0.25, 0.5, 0.75, 1],
      rootMargin: `-${bar}px 0px 0px 0px`,
    });
    const input = () => this.onInput();
    for (const type of ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "scroll"]) {
      addEventListener(type, input, { capture: true, passive: true });
    }
    addEventListener("blur", () => this.syncAll());
    addEventListener("focus", () => this.syncAll());
    setInterval(() => this.checkIdle(), 1000);
  }

  active() {
    return document.visibilityState === "visible" && document.hasFocus() && !this.idle;
  }

  watch(el, id, session) {
    this.tiles.set(el, { el, id, session, inView: false, loaded: false, since: null, acc: 0 });
    this.observer.observe(el);
  }

  loaded(el) {
    const tile = this.tiles.get(el);
    if (tile) {
      tile.loaded = true;
      this.sync(tile, now());
    }
  }

  /** While the viewer shows ``el`` large, only it is being looked at; null: the feed again. */
  focusOn(el) {
    this.only = el;
    this.syncAll();
    for (const tile of this.tiles.values()) if (!tile.inView && tile.el !== el) this.end(tile);
  }

  onIntersect(entries) {
    const t = now();
    for (const entry of entries) {
      const tile = this.tiles.get(entry.target);
      if (!tile) continue;
      const viewport = entry.rootBounds?.height ?? innerHeight;
      tile.inView = entry.isIntersecting && (entry.intersectionRatio >= CONFIG.visibleRatio ||
        entry.intersectionRect.height >= viewport * CONFIG.visibleRatio);
      this.sync(tile, t);
      if (!tile.inView && this.only !== tile.el) this.end(tile);
    }
  }

  sync(tile, t) {
    const looked = this.only ? this.only === tile.el : tile.inView;
    const counting = looked && tile.loaded && this.active();
    if (counting && tile.since === null) {
      tile.since = t;
    } else if (!counting && tile.since !== null) {
      tile.acc += Math.max(0, t - tile.since);
      tile.since = null;
    }
  }

  syncAll(t = now()) {
    for (const tile of this.tiles.values()) this.sync(tile, t);
  }

  /** Report the look so far as one event; a look still in progress goes on as a new one. */
  end(tile) {
    if (tile.since !== null) {
      const t = now();
      tile.acc += t - tile.since;
      tile.since = t;
    }
    if (tile.acc >= 1) this.report(tile.session, tile.id, tile.acc);
    tile.acc = 0;
  }

  /** The page may be going away (hidden): every look so far is reported now. */
  endAll() {
    this.syncAll();
    for (const tile of this.tiles.values()) this.end(tile);
  }

  release(el) {
    const tile = this.tiles.get(el);
    if (!tile) return;
    this.observer.unobserve(el);
    tile.inView = false;
    this.sync(tile, now());
    this.end(tile);
    this.tiles.delete(el);
  }

  releaseAll() {
    this.only = null;
    for (const el of [...this.tiles.keys()]) this.release(el);
  }

  onInput() {
    this.lastInput = now();
    if (this.idle) {
      this.idle = false;
      this.syncAll();
    }
  }

  checkIdle() {
    if (!this.idle && now() - this.lastInput >= CONFIG.idleMs) {
      this.idle = true;
      this.syncAll(this.lastInput + CONFIG.idleMs); // counted up to the last sign of life
    }
  }
}

// ---------------------------------------------------------------------------------- feedback

/**
 * Batches dwell events and sends each exactly once: an event leaves the queue when it is sent.
 * A failed request is retried with the same event ids (the server counts an id once).
 */
class FeedbackQueue {
  constructor(onAck, resolve = (session) => session, onLost = () => false) {
    this.onAck = onAck; // (sessionId, {accepted, duplicates}) => void
    this.resolve = resolve; // the session an event of an ended one goes to now (see resumeSession)
    this.onLost = onLost; // (sessionId) => true when a new session takes over its scroll
    this.requeued = new Set(); // ids of events sent back to the queue once already
    this.pending = [];
    this.sent = 0; // events handed to fetch or sendBeacon, retries not counted
    setInterval(() => this.flush(), CONFIG.flushMs);
  }

  add(session, imageId, dwellMs) {
    const event = { event_id: uuid(), image_id: imageId, dwell_ms: Math.round(dwellMs) };
    this.pending.push({ session, event });
    if (this.pending.length >= CONFIG.batchSize) this.flush();
  }

  flush({ beacon = false } = {}) {
    if (!this.pending.length) return;
    const bySession = new Map();
    for (const { session: given, event } of this.pending.splice(0)) {
      const session = this.resolve(given);
      if (!bySession.has(session)) bySession.set(session, []);
      bySession.get(session).push(event);
    }
    for (const [session, events] of bySession) {
      const body = { session_id: session, events };
      this.sent += events.length;
      if (beacon && this.beacon(body)) continue;
      this.post(body, 0);
    }
  }

  beacon(body) {
    if (!navigator.sendBeacon) return false;
    const blob = new Blob([JSON.stringify(body)], { type: "application/json" });
    return navigator.sendBeacon("/v1/feedback", blob);
  }

  async post(body, attempt) {
    try {
      const result = await api("/v1/feedback", { method: "POST", json: body, keepalive: true });
      this.onAck(body.session_id, result);
    } catch (error) {
      const lost = error instanceof ApiError && error.code === "unknown_session";
      const fresh = body.events.filter((event) => !this.requeued.has(event.event_id));
      if (lost && fresh.length && this.onLost(body.session_id)) {
        // The server forgot the session: these looks wait for the one that takes over.
        for (const event of fresh) {
          this.requeued.add(event.event_id);
          this.pending.push({ session: body.session_id, event });
        }
        return;
      }
      if (error instanceof ApiError && error.retryable && attempt < CONFIG.maxRetries) {
        const wait = (error.retryAfter ?? 2 ** attempt) * 1000;
        setTimeout(() => this.post(body, attempt + 1), wait);
      } else {
        console.warn("lookalike: dropped %d feedback events: %s", body.events.length, error.message);
      }
    }
  }
}

// ---------------------------------------------------------------------------------- layout

/** Masonry: each tile goes to the shortest column; heights come from the items' aspect ratios,
 * known before any image loads, so nothing moves once placed. */
class Masonry {
  constructor(root) {
    this.root = root;
    this.tiles = []; // feed order: {el, ratio}
    this.columns = [];
    this.heights = [];
    new ResizeObserver(() => this.fit()).observe(root);
  }

  wantedColumns() {
    if (document.documentElement.dataset.layout === "column") return 1;
    const width = this.root.clientWidth || innerWidth;
    return Math.max(2, Math.min(6, Math.floor((width + CONFIG.gapPx) / (CONFIG.minColumnPx + CONFIG.gapPx))));
  }

  fit() {
    const n = this.wantedColumns();
    if (n !== this.columns.length) this.rebuild(n);
  }

  rebuild(n) {
    const focused = document.activeElement?.closest?.(".tile");
    this.columns = Array.from({ length: n }, () => {
      const column = document.createElement("div");
      column.className = "column";
      return column;
    });
    this.heights = new Array(n).fill(0);
    this.root.replaceChildren(...this.columns);
    for (const tile of this.tiles) this.place(tile);
    if (focused) focused.focus({ preventScroll: true });
  }

  add(el, ratio) {
    if (!this.columns.length) this.rebuild(this.wantedColumns());
    const tile = { el, ratio };
    this.tiles.push(tile);
    this.place(tile);
  }

  place(tile) {
    const i = this.heights.indexOf(Math.min(...this.heights));
    this.columns[i].append(tile.el);
    this.heights[i] += tile.ratio + 0.06;
  }

  clear() {
    this.tiles = [];
    this.columns = [];
    this.heights = [];
    this.root.replaceChildren();
  }

  /** The tile next to ``el`` in direction dx (columns) / dy (rows), as the eye sees it. */
  neighbour(el, dx, dy) {
    const column = el.parentElement;
    if (dy) return dy > 0 ? el.nextElementSibling : el.previousElementSibling;
    const index = this.columns.indexOf(column) + dx;
    if (index < 0 || index >= this.columns.length) return null;
    const mid = el.getBoundingClientRect().top + el.offsetHeight / 2;
    let best = null;
    let distance = Infinity;
    for (const candidate of this.columns[index].children) {
      const rect = candidate.getBoundingClientRect();
      const d = Math.abs(rect.top + rect.height / 2 - mid);
      if (d < distance) [best, distance] = [candidate, d];
    }
    return best;
  }

  step(el, delta) {
    const index = this.tiles.findIndex((tile) => tile.el === el);
    return this.tiles[index + delta]?.el ?? null;
  }
}

// ---------------------------------------------------------------------------------- the page

const ui = {
  start: $("#start"),
  results: $("#results"),
  feed: $("#feed"),
  sentinel: $("#sentinel"),
  status: $("#status"),
  form: $("#query-form"),
  text: $("#text-query"),
  file: $("#file-input"),
  thumb: $("#query-thumb"),
  thumbImg: $("#query-thumb-img"),
  cardImg: $("#query-card-img"),
  cardText: $("#query-card-text"),
  cardKind: $("#query-card-kind"),
  terms: $("#terms"),
  termsHint: $("#terms-hint"),
  stats: $("#stats"),
  overlay: $("#drop-overlay"),
  viewer: $("#viewer"),
  toast: $("#toast"),
};

const state = {
  session: null,
  token: 0, // bumped by every new search: answers to older ones are dropped
  shown: new Set(),
  pages: 0,
  loading: false,
  ended: false,
  queryUrl: null, // object URL of the dropped image, revoked on the next search
  viewing: null,
  request: null, // the search that started this scroll: run again if the server forgot it
  resumed: new Map(), // ended session -> the one that took over its scroll
};

const masonry = new Masonry(ui.feed);
const queue = new FeedbackQueue((session, result) => {
  if (session === state.session && result.accepted > 0) refreshTerms();
}, (session) => state.resumed.get(session) ?? session, (session) => {
  if (state.resumed.has(session)) return true;
  if (session !== state.session || !state.request) return false;
  if (!state.loading) resumeSession(state.token);
  return true;
});
const tracker = new DwellTracker((session, imageId, ms) => queue.add(session, imageId, ms));

// -- status line and toasts

function setStatus(kind, html = "") {
  ui.status.dataset.kind = kind;
  ui.status.innerHTML = html;
  ui.feed.setAttribute("aria-busy", String(kind === "loading"));
}

let toastTimer = 0;
function toast(message) {
  ui.toast.textContent = message;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { ui.toast.hidden = true; }, 5000);
}

function explain(error) {
  if (error instanceof ApiError) return sentence(error.message);
  console.error(error);
  return "Something went wrong.";
}

// -- searching

function showQuery({ image = null, text = null }) {
  if (state.queryUrl && state.queryUrl !== image) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = image?.startsWith("blob:") ? image : null;
  ui.thumb.hidden = !image;
  ui.cardImg.hidden = !image;
  ui.cardText.hidden = !text;
  if (image) {
    ui.thumbImg.src = image;
    ui.cardImg.src = image;
  }
  ui.cardText.textContent = text ? `“${text}”` : "";
  ui.cardKind.textContent = image ? "Lookalikes of this image" : "Images matching";
  ui.text.value = text ?? "";
}

function resetFeed() {
  tracker.releaseAll(); // looks in progress end now, and belong to the old session
  queue.flush();
  masonry.clear();
  state.shown.clear();
  state.pages = 0;
  state.ended = false;
  ui.terms.replaceChildren();
  ui.stats.textContent = "";
  ui.termsHint.hidden = false;
  ui.start.hidden = true;
  ui.results.hidden = false;
  $("#panel").hidden = false;
  document.body.classList.add("has-results");
  scrollTo({ top: 0 });
}

async function search(request, preview) {
  const token = ++state.token;
  // A scroll on screen stays there until the new search answers: a failed one (a file that is
  // not an image, say) leaves it as it was.
  const scrolling = state.session !== null;
  if (!scrolling) {
    resetFeed();
    showQuery(preview);
    ui.feed.innerHTML = skeleton(); // where the first page will be: its tiles take its place
  }
  const status = [ui.status.dataset.kind ?? "idle", ui.status.innerHTML]; // the old scroll's
  state.loading = true;
  setStatus("loading");
  ui.feed.classList.toggle("replacing", scrolling);
  try {
    const page = await api("/v1/search", { method: "POST", ...request });
    if (token !== state.token) return;
    ui.feed.classList.remove("replacing");
    if (scrolling) {
      resetFeed();
      showQuery(preview);
    }
    state.session = page.session_id;
    state.request = request;
    state.resumed.clear();
    state.loading = false;
    addPage(page, { first: true });
    refreshTerms();
  } catch (error) {
    if (token !== state.token) return;
    state.loading = false;
    ui.feed.classList.remove("replacing");
    if (scrolling) {
      if (preview.image?.startsWith("blob:")) URL.revokeObjectURL(preview.image);
      setStatus(...status);
      toast(`That search did not work: ${explain(error)}`);
      requestAnimationFrame(maybeLoadMore);
      return;
    }
    masonry.clear();
    $("#panel").hidden = true;
    setStatus("error", `<p class="status-title">That search did not work</p>
      <p>${escapeHtml(explain(error))}</p>
      <button type="button" class="btn" data-pick>Choose another image</button>`);
  }
}

/** Back to the start screen; the looks so far are reported to the session they belong to. */
function goHome() {
  state.token += 1;
  tracker.releaseAll();
  queue.flush();
  masonry.clear();
  state.session = null;
  state.request = null;
  showQuery({});
  setStatus("idle");
  ui.results.hidden = true;
  ui.start.hidden = false;
  document.body.classList.remove("has-results");
  scrollTo({ top: 0 });
  ui.text.focus();
}

function searchFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    toast("That is not an image. Try a JPEG, PNG, WebP or GIF.");
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name || "pasted-image");
  search({ form }, { image: URL.createObjectURL(file) });
}

function searchText(text) {
  const clean = text.trim();
  if (clean) search({ json: { text: clean } }, { text: clean });
}

function searchItem(id, url) {
  search({ json: { image_id: id } }, { image: url });
}

// -- the feed

function skeleton() {
  const bars = Array.from({ length: 6 }, (_, i) => `<span style="--h:${[140, 96, 120, 110, 150, 90][i]}%"></span>`);
  return `<div class="skeleton" aria-label="Loading">${bars.join("")}</div>`;
}

function addPage(page, { first = false } = {}) {
  if (first) masonry.clear(); // the skeleton goes
  const fresh = page.items.filter((item) => !state.shown.has(item.id));
  state.pages += 1;
  for (const item of fresh) {
    state.shown.add(item.id);
    const el = makeTile(item);
    el.dataset.page = String(state.pages);
    masonry.add(el, (item.height || 1) / (item.width || 1));
    tracker.watch(el, item.id, state.session);
  }
  masonry.tiles.forEach(({ el }, i) => {
    el.setAttribute("aria-posinset", String(i + 1));
    el.setAttribute("aria-setsize", "-1"); // an endless feed: the total is unknown
  });
  if (fresh.length) {
    setStatus("idle");
    requestAnimationFrame(maybeLoadMore);
  } else if (page.items.length) {
    // All shown already: a resumed session's first pages repeat what its predecessor served.
    setTimeout(loadMore);
  } else if (page.generating) {
    setStatus("generating", `<span class="spinner" aria-hidden="true"></span><p>Generating more like this…</p>`);
    setTimeout(loadMore, CONFIG.generatingPollMs);
  } else {
    state.ended = true;
    setStatus("end", first ? emptyHtml() : endHtml());
  }
}

function emptyHtml() {
  return `<p class="status-title">No lookalikes here yet</p>
    <p>The catalog has nothing close to this. Try another image, or describe what you want above.</p>`;
}

function endHtml() {
  return `<p class="status-title">You have seen everything close to this</p>
    <p>Open any image and choose <b>More like this</b> to keep going, or drop a new one.</p>`;
}

async function loadMore() {
  if (state.loading || state.ended || !state.session) return;
  const token = state.token;
  state.loading = true;
  setStatus("loading", `<span class="dots" aria-label="Loading more"><i></i><i></i><i></i></span>`);
  try {
    const page = await api(`/v1/feed?session_id=${encodeURIComponent(state.session)}`);
    if (token !== state.token) return;
    state.loading = false;
    addPage(page);
  } catch (error) {
    if (token !== state.token) return;
    state.loading = false;
    if (error instanceof ApiError && error.status === 429) {
      setTimeout(loadMore, (error.retryAfter ?? 2) * 1000);
      return;
    }
    if (error instanceof ApiError && error.code === "unknown_session" && state.request) {
      resumeSession(token);
      return;
    }
    setStatus("error", `<p>${escapeHtml(explain(error))}</p><button type="button" class="btn" data-retry>Try again</button>`);
  }
}

/**
 * The server no longer knows this scroll's session (it restarted, or the session expired while
 * the tab idled): run the search that started it again and go on in the new session, skipping
 * what this page shows already. Looks still to be reported go to the new session.
 */
async function resumeSession(token) {
  const ended = state.session;
  state.loading = true;
  try {
    const page = await api("/v1/search", { method: "POST", ...state.request });
    if (token !== state.token) return;
    state.session = page.session_id;
    state.resumed.set(ended, page.session_id);
    for (const [old, now] of state.resumed) if (now === ended) state.resumed.set(old, page.session_id);
    state.loading = false;
    toast("The server lost this scroll's session: it goes on from your search.");
    addPage(page);
  } catch (error) {
    if (token !== state.token) return;
    state.loading = false;
    setStatus("error", `<p>${escapeHtml(explain(error))}</p><button type="button" class="btn" data-retry>Try again</button>`);
  }
}

function maybeLoadMore() {
  if (ui.results.hidden) return;
  if (ui.sentinel.getBoundingClientRect().top < innerHeight + CONFIG.prefetchPx) loadMore();
}

new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) loadMore();
}, { rootMargin: `0px 0px ${CONFIG.prefetchPx}px 0px` }).observe(ui.sentinel);

ui.status.addEventListener("click", (event) => {
  if (event.target.closest("[data-retry]")) loadMore();
  if (event.target.closest("[data-pick]")) ui.file.click();
});

function makeTile(item) {
  const el = document.createElement("article");
  el.className = "tile";
  el.tabIndex = 0;
  el.dataset.id = item.id;
  el.dataset.pick = item.pick;
  el.item = item;
  const described = item.prompt || item.tags.join(", ") || "Untitled image";
  el.setAttribute("aria-label", described.slice(0, 160));

  el.style.setProperty("--ar", String((item.width || 1) / (item.height || 1)));

  const frame = document.createElement("div");
  frame.className = "frame";
  frame.style.aspectRatio = `${item.width || 1} / ${item.height || 1}`;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.decoding = "async";
  if (item.width && item.height) {
    img.width = item.width;
    img.height = item.height;
  }
  img.alt = described.slice(0, 300);
  img.addEventListener("load", () => {
    el.classList.add("loaded");
    tracker.loaded(el);
  }, { once: true });
  img.addEventListener("error", () => el.classList.add("broken"), { once: true });
  img.src = item.url;
  frame.append(img);
  el.append(frame);

  const badges = document.createElement("div");
  badges.className = "badges";
  if (item.pick === "explore") {
    badges.insertAdjacentHTML("beforeend",
      `<span class="badge explore" title="An exploration pick: a little off your taste, to learn more about it"><svg class="icon" aria-hidden="true"><use href="#i-spark"/></svg>explore</span>`);
  }
  if (item.generated) badges.insertAdjacentHTML("beforeend", `<span class="badge">generated</span>`);
  if (badges.childElementCount) el.append(badges);

  const info = document.createElement("div");
  info.className = "info";
  const prompt = document.createElement("p");
  prompt.className = "prompt";
  prompt.textContent = item.prompt || "No prompt";
  info.append(prompt, tagList(item.tags.slice(0, 6)));
  el.append(info);
  return el;
}

function tagList(tags) {
  const list = document.createElement("ul");
  list.className = "tags";
  for (const tag of tags) {
    const li = document.createElement("li");
    li.textContent = tag;
    list.append(li);
  }
  return list;
}

// -- what the feed has learned

let termsTimer = 0;
function refreshTerms() {
  clearTimeout(termsTimer);
  termsTimer = setTimeout(loadTerms, 150);
}

async function loadTerms() {
  const session = state.session;
  if (!session) return;
  try {
    const info = await api(`/v1/sessions/${encodeURIComponent(session)}`);
    if (session === state.session) renderTerms(info);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) console.warn("lookalike: terms:", error.message);
  }
}

function renderTerms(info) {
  const terms = info.terms.filter((t) => t.weight > 0);
  const top = Math.max(...terms.map((t) => t.weight), 1e-9);
  ui.terms.replaceChildren(...terms.map(({ term, weight }) => {
    const li = document.createElement("li");
    li.className = "term";
    li.style.setProperty("--w", (0.15 + 0.85 * weight / top).toFixed(3));
    const name = document.createElement("span");
    name.className = "term-name";
    name.textContent = term;
    const mute = document.createElement("button");
    mute.type = "button";
    mute.className = "term-mute";
    mute.title = "Less of this";
    mute.setAttribute("aria-label", `Less of ${term}`);
    mute.innerHTML = `<svg class="icon" aria-hidden="true"><use href="#i-x"/></svg>`;
    mute.addEventListener("click", () => muteTerm(term, li));
    li.append(name, mute);
    return li;
  }));
  ui.termsHint.hidden = terms.length > 0;
  const looks = info.feedback_events;
  ui.stats.textContent = `${info.served} shown · ${looks} look${looks === 1 ? "" : "s"} counted`;
}

async function muteTerm(term, li) {
  li.classList.add("leaving");
  try {
    await api(`/v1/sessions/${encodeURIComponent(state.session)}/mute`, { method: "POST", json: { term } });
    toast(`Showing less of “${term}”`);
  } catch (error) {
    li.classList.remove("leaving");
    toast(explain(error));
  }
  refreshTerms();
}

// -- the large view

async function openViewer(el) {
  const item = el.item;
  state.viewing = el;
  tracker.focusOn(el);
  const img = $("#viewer-img");
  img.src = item.url;
  img.alt = el.getAttribute("aria-label");
  img.style.aspectRatio = `${item.width || 1} / ${item.height || 1}`;
  $("#viewer-prompt").textContent = item.prompt || "No prompt";
  $("#viewer-tags").replaceWith(Object.assign(tagList(item.tags), { id: "viewer-tags" }));
  const meta = $("#viewer-meta");
  meta.replaceChildren();
  ui.viewer.showModal();
  try {
    const details = await api(`${item.url}/meta`);
    if (state.viewing !== el) return;
    const rows = [
      ["Size", details.width && details.height ? `${details.width} × ${details.height}` : null],
      ["Model", details.model_name || details.base_model],
      ["By", details.username],
      ["Why", item.pick === "explore" ? "exploring a little off your taste" : "close to what you look at"],
    ];
    for (const [label, value] of rows.filter(([, v]) => v)) {
      meta.insertAdjacentHTML("beforeend", `<dt>${label}</dt><dd>${escapeHtml(String(value))}</dd>`);
    }
  } catch (error) {
    console.warn("lookalike: meta:", error.message);
  }
}

ui.viewer.addEventListener("close", () => {
  const el = state.viewing;
  state.viewing = null;
  tracker.focusOn(null);
  if (el?.isConnected) el.focus({ preventScroll: true });
});
ui.viewer.addEventListener("click", (event) => {
  if (event.target === ui.viewer) ui.viewer.close(); // the backdrop
});
$("#viewer-close").addEventListener("click", () => ui.viewer.close());
$("#viewer-x").addEventListener("click", () => ui.viewer.close());
$("#viewer-more").addEventListener("click", () => {
  const item = state.viewing?.item;
  ui.viewer.close();
  if (item) searchItem(item.id, item.url);
});

// -- input: drop, pick, paste, type

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  ui.text.blur(); // the keys go back to the feed (and a phone's keyboard closes)
  searchText(ui.text.value);
});
ui.file.addEventListener("change", () => {
  searchFile(ui.file.files?.[0]);
  ui.file.value = "";
});
ui.thumb.addEventListener("click", () => ui.file.click());
// A dropped file the browser cannot show either: no broken-image icon as the query.
ui.thumbImg.addEventListener("error", () => { ui.thumb.hidden = true; });
ui.cardImg.addEventListener("error", () => { ui.cardImg.hidden = true; });
$("#new-search").addEventListener("click", goHome);
$("#dropzone").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    ui.file.click();
  }
});

let dragDepth = 0;
const hasFiles = (event) => [...(event.dataTransfer?.types ?? [])].includes("Files");
addEventListener("dragenter", (event) => {
  if (!hasFiles(event)) return;
  dragDepth += 1;
  document.body.classList.add("dragging");
});
addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) document.body.classList.remove("dragging");
});
addEventListener("dragover", (event) => {
  if (hasFiles(event)) event.preventDefault();
});
addEventListener("drop", (event) => {
  if (!hasFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  document.body.classList.remove("dragging");
  searchFile([...event.dataTransfer.files].find((f) => f.type.startsWith("image/")) ?? event.dataTransfer.files[0]);
});

addEventListener("paste", (event) => {
  const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
  if (file) {
    event.preventDefault();
    searchFile(file);
  }
});

// -- layout toggle

function setLayout(layout) {
  document.documentElement.dataset.layout = layout;
  for (const button of document.querySelectorAll("[data-layout]")) {
    if (button instanceof HTMLButtonElement) button.setAttribute("aria-pressed", String(button.dataset.layout === layout));
  }
  try { localStorage.setItem("lookalike.layout", layout); } catch { /* private mode */ }
  masonry.fit();
}

function switchLayout(layout) {
  const anchor = document.activeElement?.closest?.(".tile") ?? firstVisibleTile();
  setLayout(layout);
  anchor?.scrollIntoView({ block: "center" }); // the reader keeps their place
}

for (const button of document.querySelectorAll("button[data-layout]")) {
  button.addEventListener("click", () => switchLayout(button.dataset.layout));
}

// -- keyboard

function focusTile(el) {
  if (!el) {
    maybeLoadMore(); // at the end of what is loaded: more is on its way
    return;
  }
  el.focus({ preventScroll: true });
  const smooth = !matchMedia("(prefers-reduced-motion: reduce)").matches;
  el.scrollIntoView({ block: "nearest", behavior: smooth ? "smooth" : "auto" });
  if (!masonry.step(el, 1)) maybeLoadMore();
}

function firstVisibleTile() {
  const below = document.querySelector(".bar").offsetHeight + 8; // not hidden under the bar
  return masonry.tiles.map((tile) => tile.el).find((el) => el.getBoundingClientRect().bottom > below) ?? null;
}

addEventListener("keydown", (event) => {
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey) return;
  if (ui.viewer.open) return;
  const typing = event.target.closest?.("input, textarea, select, [contenteditable]");
  if (typing) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.key === "/") {
    event.preventDefault();
    ui.text.focus();
    return;
  }
  if (event.key === "g") {
    switchLayout(document.documentElement.dataset.layout === "grid" ? "column" : "grid");
    return;
  }
  const tile = event.target.closest?.(".tile");
  const moves = {
    j: [0, 0, 1], k: [0, 0, -1],
    ArrowDown: [0, 1], ArrowUp: [0, -1], ArrowRight: [1, 0], ArrowLeft: [-1, 0],
  };
  const move = moves[event.key];
  if (tile && event.key === "Enter") {
    event.preventDefault();
    openViewer(tile);
  } else if (move && tile) {
    event.preventDefault();
    const [dx, dy, step] = move;
    focusTile(step ? masonry.step(tile, step) : masonry.neighbour(tile, dx, dy));
  } else if ((event.key === "j" || event.key === "k") && !ui.results.hidden) {
    event.preventDefault();
    focusTile(firstVisibleTile());
  }
});

ui.feed.addEventListener("click", (event) => {
  const tile = event.target.closest(".tile");
  if (tile) openViewer(tile);
});

// -- the page's life: a hidden page may never come back, so what it knows is sent now

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden") {
    tracker.endAll();
    queue.flush({ beacon: true });
  } else {
    tracker.syncAll();
  }
});
addEventListener("pagehide", () => {
  tracker.endAll();
  queue.flush({ beacon: true });
});

function sentence(text) {
  const clean = text.trim();
  return clean.charAt(0).toUpperCase() + clean.slice(1) + (/[.!?]$/.test(clean) ? "" : ".");
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// -- start

if (matchMedia("(max-width: 600px)").matches) ui.text.placeholder = "Describe an image";
try {
  const saved = localStorage.getItem("lookalike.layout");
  if (saved === "grid" || saved === "column") setLayout(saved);
} catch { /* private mode */ }

// Hook for tests and debugging: counts only, nothing that identifies anyone.
window.lookalike = Object.freeze({
  get session() { return state.session; },
  get pendingEvents() { return queue.pending.length; },
  get sentEvents() { return queue.sent; },
});
