// Web chat client: one WebSocket to any node of the cluster (PROTOCOL.md), failover across
// nodes, per-room sequencing (dedupe by seq, gap fill, history on scroll-up) and an outbox of
// unacked sends that survives reconnects. No framework, no build step; every string that
// comes from the network reaches the page through textContent only.
'use strict';

(() => {
  // ---------------------------------------------------------------------------------------
  // Constants

  const USER_RE = /^[A-Za-z0-9_.-]{1,32}$/;
  const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
  // '@' is outside the room charset, so the pseudo-room key can never collide with a room.
  const DIRECT = '@direct';

  // A frozen node keeps its sockets open: the ping is what notices it. The cluster itself
  // declares a silent node down after 3 s, so the page should not wait much longer.
  const PING_INTERVAL_MS = 5000;
  const PONG_TIMEOUT_MS = 4000;
  // A node that accepts TCP but never answers the upgrade (stopped process) would otherwise
  // leave the socket in CONNECTING forever.
  const CONNECT_TIMEOUT_MS = 8000;
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 5000;
  // A connection shorter than this does not reset the backoff, so a node that accepts and
  // immediately drops us is not hammered every 250 ms.
  const STABLE_CONNECTION_MS = 3000;
  const HISTORY_PAGE = 50;
  const HISTORY_MAX = 500;
  const SEND_RETRIES = 5;
  // The server's text limit is configurable (default 4096 bytes) and reported as `too_large`;
  // this client-side cap only keeps a frame under the default 64 KiB frame limit, because an
  // oversized frame closes the socket (1009) and the resend after reconnect would loop.
  const MAX_CLIENT_TEXT_BYTES = 60000;
  const DEFAULT_TEXT_LIMIT_BYTES = 4096;
  // Replayed messages may arrive after `joined`; give them this long before filling the tail.
  const TAIL_CHECK_MS = 1500;
  const NEAR_BOTTOM_PX = 40;
  const NEAR_TOP_PX = 80;

  const CLOSE_REASONS = {
    1000: 'closed',
    1001: 'node shutting down',
    1006: 'connection lost',
    1008: 'policy violation',
    1009: 'message too big',
    1011: 'server error',
    1012: 'node restarting',
    1013: 'too slow or node overloaded',
    4000: 'no pong',
    4001: 'connect timed out',
  };

  const RETRYABLE = new Set(['unavailable', 'rate_limited']);

  // ---------------------------------------------------------------------------------------
  // State

  const S = {
    active: false, // logged in (the login form is hidden)
    user: '', // name typed at login, used in the /ws query
    token: '', // sent as the first frame (`auth`), never in the URL, which ends up in logs
    tokenUrl: '', // `?token_url=`: where a fresh token can be fetched, to `refresh` before `exp`
    me: null, // name the node confirmed in `welcome` (the token's `sub` when auth is on)
    nodes: [], // [{host, secure}], rotated on each reconnect
    nodeIdx: 0,
    nodesFromQuery: false,
    ws: null,
    conn: 0, // bumps on every connect: frames and timers of older sockets are ignored
    connected: false, // `welcome` received on the current socket
    node: null,
    session: null,
    connectedAt: 0,
    attempt: 0,
    everConnected: false,
    lastClose: null,
    timers: { reconnect: 0, connect: 0, ping: 0, pong: 0, refresh: 0 },
    refs: new Map(), // ref -> request context, cleared per connection
    nextRef: 1,
    rooms: new Map(), // name -> room
    direct: null, // the Direct pseudo-room
    view: null, // room name, DIRECT, or null
    outbox: new Map(), // client id -> unacked send or direct, in creation order
    directTarget: null,
    selfDirects: new Map(), // text -> count of acked directs to ourselves not yet echoed back
    sysCounter: 0,
  };

  function newRoom(name) {
    return {
      name,
      lastSeq: 0, // highest seq seen, from events and history
      synced: false, // a first `joined` arrived: later joins resume with `since`
      joined: false, // joined on the current socket
      joinSeq: 0,
      joinAttempts: 0,
      msgs: new Map(), // seq -> message
      minSeq: Infinity,
      items: [], // timeline: {k, n, el} sorted by (k, n); messages have n = 0
      gaps: new Map(), // before -> from, history requests filling holes
      unread: 0,
      members: [],
      loadingOlder: false,
      historyDone: false,
      scroll: null, // saved scrollTop while another view is shown; null = stick to bottom
      whoTimer: 0,
    };
  }

  // ---------------------------------------------------------------------------------------
  // Small helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function randomId() {
    const b = new Uint8Array(8);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }

  const encoder = new TextEncoder();
  const utf8Len = (s) => encoder.encode(s).length;

  function jitter(ms) {
    return Math.round(ms * (0.8 + Math.random() * 0.4));
  }

  function backoffMs(attempt) {
    return Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(attempt, 10));
  }

  function fmtTime(ts) {
    if (typeof ts !== 'number' || !isFinite(ts)) return '';
    const d = new Date(ts);
    const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    const now = new Date();
    if (d.toDateString() === now.toDateString()) return hm;
    return d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + ' ' + hm;
  }

  function nameColor(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return `hsl(${h % 360}, 55%, 36%)`;
  }

  // Links are built as elements with a vetted href, so text never goes through HTML parsing.
  const URL_RE = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/gi;

  function richText(text) {
    const frag = document.createDocumentFragment();
    let last = 0;
    for (const m of text.matchAll(URL_RE)) {
      if (m.index > last) frag.append(document.createTextNode(text.slice(last, m.index)));
      const a = el('a', null, m[0]);
      a.href = m[0];
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      frag.append(a);
      last = m.index + m[0].length;
    }
    if (last < text.length) frag.append(document.createTextNode(text.slice(last)));
    return frag;
  }

  function mentionsMe(text) {
    if (!S.me) return false;
    const esc = S.me.replace(/[.*+?^${}()|[\]\\-]/g, '\\$&');
    return new RegExp(`(^|[^A-Za-z0-9_.-])@?${esc}($|[^A-Za-z0-9_-])`).test(text);
  }

  // ---------------------------------------------------------------------------------------
  // Persistence: the user name and joined rooms survive reloads; the token stays in the tab.

  const store = {
    get(key, fallback) {
      try {
        const v = localStorage.getItem(key);
        return v === null ? fallback : JSON.parse(v);
      } catch {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem(key, JSON.stringify(value));
      } catch {
        // Storage can be full or disabled (private mode); the session still works.
      }
    },
  };

  const roomsKey = (user) => `chat.rooms.${user}`;
  const viewKey = (user) => `chat.view.${user}`;

  function saveRooms() {
    store.set(roomsKey(S.me || S.user), [...S.rooms.keys()]);
  }

  function saveView() {
    store.set(viewKey(S.me || S.user), S.view);
  }

  function loadRooms(user) {
    const names = store.get(roomsKey(user), []);
    if (!Array.isArray(names)) return;
    for (const n of names) {
      if (typeof n === 'string' && ROOM_RE.test(n) && !S.rooms.has(n)) S.rooms.set(n, newRoom(n));
    }
  }

  // ---------------------------------------------------------------------------------------
  // Node list

  function selfNode() {
    return {
      host: location.host || 'localhost:8080',
      secure: location.protocol === 'https:',
    };
  }

  function parseNode(s) {
    s = s.trim();
    if (!s) return null;
    try {
      if (s.includes('://')) {
        const u = new URL(s);
        return { host: u.host, secure: u.protocol === 'https:' || u.protocol === 'wss:' };
      }
      const u = new URL('http://' + s);
      return { host: u.host, secure: location.protocol === 'https:' };
    } catch {
      return null;
    }
  }

  function addNode(list, n) {
    if (n && n.host && !list.some((x) => x.host === n.host)) list.push(n);
  }

  function initNodes() {
    const q = new URLSearchParams(location.search).get('nodes');
    const list = [];
    if (q) for (const part of q.split(',')) addNode(list, parseNode(part));
    S.nodesFromQuery = list.length > 0;
    if (!S.nodesFromQuery) addNode(list, selfNode());
    S.nodes = list;
    S.nodeIdx = 0;
  }

  function currentNode() {
    return S.nodes[S.nodeIdx % S.nodes.length];
  }

  function applyCluster(json) {
    if (!json || !Array.isArray(json.members)) return;
    const list = [];
    addNode(list, selfNode());
    for (const m of json.members) {
      if (!m || m.status !== 'up' || typeof m.public_url !== 'string') continue;
      addNode(list, parseNode(m.public_url));
    }
    // Keep the node we are on in the rotation, so the index below stays meaningful.
    const cur = currentNode();
    addNode(list, cur);
    S.nodes = list;
    S.nodeIdx = list.findIndex((x) => x.host === cur.host);
  }

  async function refreshNodes() {
    if (S.nodesFromQuery) return;
    const bases = [];
    if (location.protocol === 'http:' || location.protocol === 'https:') bases.push(location.origin);
    const cur = currentNode();
    const curBase = (cur.secure ? 'https://' : 'http://') + cur.host;
    if (!bases.includes(curBase)) bases.push(curBase); // may be refused by CORS: ignored
    for (const base of bases) {
      const ctl = new AbortController();
      const t = setTimeout(() => ctl.abort(), 3000);
      try {
        const r = await fetch(base + '/cluster', { cache: 'no-store', signal: ctl.signal });
        if (!r.ok) continue;
        applyCluster(await r.json());
        return;
      } catch {
        // The list is a best effort: the current one keeps working.
      } finally {
        clearTimeout(t);
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Connection

  function wsUrl(node) {
    return `${node.secure ? 'wss' : 'ws'}://${node.host}/ws?user=${encodeURIComponent(S.user)}`;
  }

  function clearConnTimers() {
    clearTimeout(S.timers.connect);
    clearInterval(S.timers.ping);
    clearTimeout(S.timers.pong);
    clearTimeout(S.timers.refresh);
    S.timers.connect = S.timers.ping = S.timers.pong = S.timers.refresh = 0;
  }

  // Tokens: the `exp` claim (read, not verified: the node does that), and a fresh token from
  // `token_url` when the page was given one.

  function tokenExp(token) {
    try {
      const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const exp = JSON.parse(atob(payload)).exp;
      return typeof exp === 'number' ? exp : null;
    } catch {
      return null;
    }
  }

  async function fetchToken() {
    const r = await fetch(S.tokenUrl, { cache: 'no-store', credentials: 'include' });
    if (!r.ok) throw new Error(`${S.tokenUrl}: HTTP ${r.status}`);
    const token = (await r.text()).trim();
    if (!token) throw new Error(`${S.tokenUrl}: no token`);
    return token;
  }

  // Sends `refresh` halfway to the token's `exp`, so the node never closes the connection for it.
  function scheduleRefresh(conn) {
    clearTimeout(S.timers.refresh);
    S.timers.refresh = 0;
    const exp = tokenExp(S.token);
    if (!S.tokenUrl || exp === null) return;
    const wait = Math.max(1000, ((exp * 1000 - Date.now()) / 2) | 0);
    S.timers.refresh = setTimeout(async () => {
      let token;
      try {
        token = await fetchToken();
      } catch (e) {
        notice(`token refresh failed: ${e.message}`, true);
        return;
      }
      if (conn !== S.conn || !S.connected) return;
      S.token = token;
      request({ type: 'refresh', token }, { kind: 'refresh' });
    }, wait);
  }

  function connect() {
    clearTimeout(S.timers.reconnect);
    S.timers.reconnect = 0;
    if (!S.active) return;
    const node = currentNode();
    const conn = ++S.conn;
    setStatus('connecting', `connecting to ${node.host}…`);
    let ws;
    try {
      ws = new WebSocket(wsUrl(node));
    } catch (e) {
      S.ws = null;
      onDown(conn, 1006, String(e && e.message ? e.message : e));
      return;
    }
    S.ws = ws;
    // Without a token in the upgrade request, the node waits for it as the first frame.
    ws.onopen = () => {
      if (conn === S.conn && S.token) send({ type: 'auth', ref: 'auth', token: S.token });
    };
    ws.onmessage = (ev) => {
      if (conn === S.conn) onFrame(ev.data);
    };
    // `error` is always followed by `close`, which carries the code worth showing.
    ws.onerror = () => {};
    ws.onclose = (ev) => onDown(conn, ev.code, ev.reason);
    S.timers.connect = setTimeout(() => drop(conn, 4001), CONNECT_TIMEOUT_MS);
  }

  // Gives up on a socket that looks dead without waiting for the browser's own timeout.
  function drop(conn, code) {
    if (conn !== S.conn || !S.ws) return;
    const ws = S.ws;
    ws.onclose = ws.onmessage = null;
    try {
      ws.close();
    } catch {
      // Already closing.
    }
    onDown(conn, code, '');
  }

  function onDown(conn, code, reason) {
    if (conn !== S.conn) return;
    const wasConnected = S.connected;
    S.ws = null;
    S.connected = false;
    S.node = null;
    clearConnTimers();
    S.refs.clear();
    for (const room of S.rooms.values()) {
      room.joined = false;
      room.loadingOlder = false;
    }
    for (const p of S.outbox.values()) {
      if (p.state === 'inflight') p.state = 'queued';
    }
    if (wasConnected && Date.now() - S.connectedAt >= STABLE_CONNECTION_MS) S.attempt = 0;
    S.lastClose = { code, reason };
    renderRoomList();
    if (!S.active) return;
    if (code === 1008 && S.token) return tokenRefused(reason);

    // Another node may be alive while this one is not: rotate before every attempt.
    if (S.nodes.length > 1) S.nodeIdx = (S.nodeIdx + 1) % S.nodes.length;
    const delay = jitter(backoffMs(S.attempt));
    S.attempt++;
    const why = CLOSE_REASONS[code] || 'closed';
    const extra = reason && reason !== why ? `: ${reason}` : '';
    let text = `disconnected (${code} ${why}${extra})`;
    text += ` — reconnecting to ${currentNode().host} in ${(delay / 1000).toFixed(1)} s`;
    if (!S.everConnected && S.attempt >= 4) {
      text += S.token ? ' (is the token valid?)' : ' (does the cluster require a token?)';
    }
    setStatus('down', text);
    S.timers.reconnect = setTimeout(connect, delay);
  }

  // The node closed the connection for its token (expired, or refused as the first frame):
  // another attempt with the same token would fail alike.
  async function tokenRefused(reason) {
    if (S.tokenUrl) {
      try {
        S.token = await fetchToken();
        setStatus('down', `token refused (${reason || 'policy'}); reconnecting with a new one`);
        S.timers.reconnect = setTimeout(connect, jitter(backoffMs(S.attempt++)));
        return;
      } catch (e) {
        reason = `${reason}; ${e.message}`;
      }
    }
    const user = S.user;
    logout();
    $('user').value = user;
    $('token').value = '';
    $('login-error').textContent = `Disconnected: ${reason || 'token refused'}. Sign in with a new token.`;
    $('token').focus();
  }

  function send(frame) {
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return false;
    try {
      S.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  // Sends a request with a fresh ref; the reply is routed back to `ctx` by that ref.
  function request(frame, ctx) {
    if (!S.connected) return false;
    const ref = S.nextRef++;
    frame.ref = ref;
    ctx.conn = S.conn;
    S.refs.set(ref, ctx);
    if (!send(frame)) {
      S.refs.delete(ref);
      return false;
    }
    return ref;
  }

  function startPing(conn) {
    S.timers.ping = setInterval(() => {
      if (conn !== S.conn || !S.connected) return;
      request({ type: 'ping' }, { kind: 'ping' });
      if (!S.timers.pong) S.timers.pong = setTimeout(() => drop(conn, 4000), PONG_TIMEOUT_MS);
    }, PING_INTERVAL_MS);
  }

  function logout() {
    S.active = false;
    clearTimeout(S.timers.reconnect);
    clearConnTimers();
    const ws = S.ws;
    S.conn++;
    S.ws = null;
    S.connected = false;
    S.node = null;
    if (ws) {
      ws.onclose = ws.onmessage = null;
      try {
        ws.close(1000);
      } catch {
        // Already closing.
      }
    }
    for (const p of S.outbox.values()) clearTimeout(p.timer);
    for (const r of S.rooms.values()) clearTimeout(r.whoTimer);
    S.rooms.clear();
    S.outbox.clear();
    S.refs.clear();
    S.direct = null;
    S.view = null;
    S.me = null;
    $('app').hidden = true;
    $('login-view').hidden = false;
    document.title = 'chat';
    $('user').focus();
  }

  // ---------------------------------------------------------------------------------------
  // Incoming frames

  function onFrame(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (!f || typeof f !== 'object' || typeof f.type !== 'string') return;
    const ctx = f.ref !== undefined && f.ref !== null ? S.refs.get(f.ref) : undefined;
    if (ctx) S.refs.delete(f.ref);
    switch (f.type) {
      case 'welcome':
        return onWelcome(f);
      case 'joined':
        return onJoined(f);
      case 'left':
        return;
      case 'ack':
        return ctx && onAck(f, ctx);
      case 'history':
        return ctx && onHistory(f, ctx);
      case 'members':
        return onMembers(f);
      case 'refreshed':
        return scheduleRefresh(S.conn);
      case 'pong':
        clearTimeout(S.timers.pong);
        S.timers.pong = 0;
        return;
      case 'message':
        return onMessage(f);
      case 'direct':
        return onDirect(f);
      case 'presence':
        return onPresence(f);
      case 'error':
        return onError(f, ctx);
      default:
        return; // Newer servers may add types; ignoring them is the protocol's rule.
    }
  }

  function onWelcome(f) {
    const conn = S.conn;
    clearTimeout(S.timers.connect);
    S.timers.connect = 0;
    S.connected = true;
    S.node = typeof f.node === 'string' ? f.node : null;
    S.session = f.session || null;
    S.connectedAt = Date.now();
    const first = !S.everConnected;
    S.everConnected = true;
    const user = typeof f.user === 'string' && f.user ? f.user : S.user;
    if (first && user !== S.me) {
      // With a token the node names us after its `sub`, whose rooms may be remembered too.
      S.me = user;
      loadRooms(user);
      saveRooms();
      if (S.view === null) selectView(firstView());
      else renderView(); // names marked as ours depend on S.me
    }
    S.me = user;
    setStatus('up', `connected to ${S.node || currentNode().host} as ${S.me}`);
    $('status').title = `node ${S.node || '?'} at ${currentNode().host}, session ${S.session || '?'}`;

    for (const room of S.rooms.values()) sendJoin(room);
    flushDirects();
    startPing(conn);
    scheduleRefresh(conn);
    renderRoomList();
    refreshNodes();
  }

  function onJoined(f) {
    const room = S.rooms.get(f.room);
    if (!room) return;
    const seq = typeof f.seq === 'number' ? f.seq : 0;
    room.joined = true;
    room.joinAttempts = 0;
    room.joinSeq = seq;
    if (!room.synced) {
      room.synced = true;
      room.lastSeq = Math.max(room.lastSeq, seq);
      if (room.lastSeq > 0) loadOlder(room, room.lastSeq + 1);
      else room.historyDone = true;
    } else if (seq > room.lastSeq) {
      const conn = S.conn;
      setTimeout(() => {
        if (conn === S.conn && S.rooms.get(room.name) === room && room.lastSeq < room.joinSeq) {
          fillGap(room, room.lastSeq, room.joinSeq + 1);
        }
      }, TAIL_CHECK_MS);
    }
    flushRoom(room);
    if (S.view === room.name) {
      requestWho(room);
      renderViewInfo();
      maybeLoadMore(room);
    }
    renderRoomList();
  }

  function onMessage(f) {
    const room = S.rooms.get(f.room);
    if (!room || typeof f.seq !== 'number') return;
    if (room.synced && f.seq > room.lastSeq + 1) fillGap(room, room.lastSeq, f.seq);
    const fresh = addMessages(room, [f]);
    if (fresh && f.from !== S.me && S.view !== room.name) {
      room.unread++;
      renderRoomList();
    }
    if (fresh && S.view === room.name && f.from !== S.me && !isNearBottom()) $('jump').hidden = false;
  }

  function onAck(f, ctx) {
    const p = S.outbox.get(ctx.id);
    if (!p) return;
    if (p.kind === 'direct') {
      removeOutbox(p);
      if (p.to === S.me) S.selfDirects.set(p.text, (S.selfDirects.get(p.text) || 0) + 1);
      addDirectItem({ from: S.me, to: p.to, text: p.text, ts: Date.now() });
      return;
    }
    const room = S.rooms.get(p.room);
    removeOutbox(p);
    // The MESSAGE event may come later (or be lost with the socket): show the acked message
    // at its seq now. lastSeq is left alone, so a gap before it is still detected.
    if (room && typeof f.seq === 'number' && !room.msgs.has(f.seq)) {
      insertMessages(room, [{ room: p.room, seq: f.seq, from: S.me, text: p.text, ts: Date.now(), id: p.id }]);
    }
  }

  function onHistory(f, ctx) {
    const room = S.rooms.get(ctx.room);
    if (!room) return;
    const msgs = Array.isArray(f.messages)
      ? f.messages.filter((m) => m && typeof m.seq === 'number' && m.seq < ctx.before)
      : [];
    msgs.sort((a, b) => a.seq - b.seq);
    if (ctx.purpose === 'gap') {
      room.gaps.delete(ctx.before);
      addMessages(room, msgs);
      // A gap wider than one page is filled page by page, downwards.
      if (msgs.length && msgs[0].seq > ctx.from + 1) fillGap(room, ctx.from, msgs[0].seq);
      return;
    }
    room.loadingOlder = false;
    const before = room.minSeq;
    addMessages(room, msgs);
    if (!msgs.length || room.minSeq <= 1 || room.minSeq >= before) room.historyDone = true;
    if (S.view === room.name) {
      renderViewInfo();
      maybeLoadMore(room);
    }
  }

  function onMembers(f) {
    const room = S.rooms.get(f.room);
    if (!room || !Array.isArray(f.users)) return;
    room.members = f.users.filter((u) => typeof u === 'string');
    if (S.view === room.name) {
      renderMembers();
      renderViewInfo();
    }
  }

  function onDirect(f) {
    if (typeof f.from !== 'string') return;
    if (f.from === S.me && S.selfDirects.has(f.text)) {
      // Our own message to ourselves: already shown when it was acked.
      const n = S.selfDirects.get(f.text);
      if (n <= 1) S.selfDirects.delete(f.text);
      else S.selfDirects.set(f.text, n - 1);
      return;
    }
    addDirectItem({ from: f.from, to: S.me, text: String(f.text ?? ''), ts: f.ts });
    if (!S.directTarget) S.directTarget = f.from;
    if (S.view !== DIRECT) {
      S.direct.unread++;
      renderRoomList();
    } else {
      updatePlaceholder();
    }
  }

  function onPresence(f) {
    const room = S.rooms.get(f.room);
    if (!room || typeof f.user !== 'string') return;
    if (f.user !== S.me) {
      const verb = f.event === 'join' ? 'joined' : f.event === 'leave' ? 'left' : String(f.event);
      addSystem(room, `${f.user} ${verb}`, 'presence');
    }
    // Updated at once from the event; the `who` below corrects it from the cluster's view.
    const i = room.members.indexOf(f.user);
    if (f.event === 'join' && i < 0) room.members = [...room.members, f.user].sort();
    if (f.event === 'leave' && i >= 0) room.members = room.members.filter((u) => u !== f.user);
    if (S.view === room.name) {
      renderMembers();
      renderViewInfo();
      // A node failure makes many users leave and rejoin at once: one `who` for the burst.
      clearTimeout(room.whoTimer);
      room.whoTimer = setTimeout(() => requestWho(room), 300);
    }
  }

  function onError(f, ctx) {
    const code = String(f.code || 'error');
    const detail = typeof f.message === 'string' ? f.message : '';
    // A node without `--auth-secret` needs no `auth` frame: its refusal is harmless.
    if (f.ref === 'auth') return;
    if (!ctx) {
      notice(`${code}${detail ? ': ' + detail : ''}`, true);
      return;
    }
    switch (ctx.kind) {
      case 'send':
      case 'direct': {
        const p = S.outbox.get(ctx.id);
        if (p) outboxError(p, code, detail);
        return;
      }
      case 'join':
        return joinError(ctx.room, code, detail);
      case 'history':
        return historyError(ctx, code);
      case 'leave':
      case 'who':
      case 'ping':
        return;
      case 'refresh':
        notice(`token refresh refused: ${detail || code}; the connection closes when the token expires`, true);
        return;
      default:
        notice(`${code}${detail ? ': ' + detail : ''}`, true);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Rooms: join, leave, who, history, gaps

  function sendJoin(room) {
    const frame = { type: 'join', room: room.name };
    if (room.synced) {
      // Resume from the oldest unfilled hole, so nothing a previous gap fill missed is lost.
      let since = room.lastSeq;
      for (const from of room.gaps.values()) since = Math.min(since, from);
      room.gaps.clear();
      frame.since = since;
    }
    request(frame, { kind: 'join', room: room.name });
  }

  function joinError(name, code, detail) {
    const room = S.rooms.get(name);
    if (!room) return;
    if (code === 'invalid_room' || code === 'bad_request') {
      notice(`cannot join #${name}: ${detail || code}`, true);
      removeRoom(room);
      return;
    }
    // unavailable (owner failing over), rate_limited, internal: try again with backoff.
    room.joinAttempts++;
    const delay = jitter(backoffMs(room.joinAttempts));
    // One line per outage, not one per attempt.
    if (room.joinAttempts === 1) addSystem(room, `cannot join right now (${code}), retrying…`, 'error');
    const conn = S.conn;
    setTimeout(() => {
      if (conn === S.conn && S.connected && S.rooms.get(name) === room && !room.joined) sendJoin(room);
    }, delay);
  }

  function requestWho(room) {
    request({ type: 'who', room: room.name }, { kind: 'who', room: room.name });
  }

  function loadOlder(room, before) {
    if (room.loadingOlder || !S.connected) return;
    if (before === undefined) {
      // Until the first `joined`, lastSeq is unknown; that reply loads the first page itself.
      if (room.historyDone || !room.synced) return;
      before = Number.isFinite(room.minSeq) ? room.minSeq : room.lastSeq + 1;
    }
    if (before <= 1) {
      room.historyDone = true;
      return;
    }
    const ok = request(
      { type: 'history', room: room.name, before, limit: HISTORY_PAGE },
      { kind: 'history', purpose: 'older', room: room.name, before },
    );
    if (ok) {
      room.loadingOlder = true;
      if (S.view === room.name) renderViewInfo();
    }
  }

  // Fetches seqs in (from, before) that were skipped.
  function fillGap(room, from, before) {
    if (before - from <= 1 || room.gaps.has(before)) return;
    room.gaps.set(before, from);
    request(
      { type: 'history', room: room.name, before, limit: Math.min(before - from - 1, HISTORY_MAX) },
      { kind: 'history', purpose: 'gap', room: room.name, from, before },
    );
    // When not sent (offline), the entry stays and the next join resumes from `from`.
  }

  function historyError(ctx, code) {
    const room = S.rooms.get(ctx.room);
    if (!room) return;
    if (ctx.purpose === 'gap') {
      room.gaps.delete(ctx.before);
      if (code === 'unavailable' || code === 'rate_limited' || code === 'internal') {
        room.gaps.set(ctx.before, ctx.from); // kept for the next join if this socket dies
        setTimeout(() => {
          if (ctx.conn === S.conn && S.rooms.get(room.name) === room) {
            room.gaps.delete(ctx.before);
            fillGap(room, ctx.from, ctx.before);
          }
        }, jitter(1000));
      }
      return;
    }
    room.loadingOlder = false;
    if (S.view === room.name) renderViewInfo();
    if (code === 'unavailable' || code === 'internal') {
      // The first page matters (an empty room view looks broken): try again while in view.
      setTimeout(() => {
        if (ctx.conn === S.conn && S.rooms.get(room.name) === room && S.view === room.name) loadOlder(room);
      }, jitter(1000));
    }
  }

  function maybeLoadMore(room) {
    // Without a scrollbar the user cannot scroll up, so keep loading until there is one.
    const box = $('messages');
    if (S.view === room.name && !room.historyDone && box.scrollHeight <= box.clientHeight + NEAR_TOP_PX) {
      loadOlder(room);
    }
  }

  function joinRoom(name) {
    let room = S.rooms.get(name);
    if (!room) {
      room = newRoom(name);
      S.rooms.set(name, room);
      saveRooms();
      if (S.connected) sendJoin(room);
    }
    selectView(name);
  }

  function leaveRoom(name) {
    const room = S.rooms.get(name);
    if (!room) return;
    if (room.joined) request({ type: 'leave', room: name }, { kind: 'leave', room: name });
    removeRoom(room);
  }

  function removeRoom(room) {
    clearTimeout(room.whoTimer);
    S.rooms.delete(room.name);
    for (const p of [...S.outbox.values()]) {
      if (p.kind === 'room' && p.room === room.name) removeOutbox(p);
    }
    saveRooms();
    if (S.view === room.name) selectView(firstView());
    else renderRoomList();
  }

  function firstView() {
    const saved = store.get(viewKey(S.me || S.user), null);
    if (saved === DIRECT || (typeof saved === 'string' && S.rooms.has(saved))) return saved;
    const first = S.rooms.keys().next();
    return first.done ? null : first.value;
  }

  // ---------------------------------------------------------------------------------------
  // Timeline: messages sorted by seq, system lines after the seq they followed, outbox last

  function cmpItem(a, b) {
    return a.k - b.k || a.n - b.n;
  }

  function viewOf(room) {
    return room === S.direct ? DIRECT : room.name;
  }

  function insertItem(room, item) {
    const a = room.items;
    let lo = 0;
    let hi = a.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cmpItem(a[mid], item) < 0) lo = mid + 1;
      else hi = mid;
    }
    a.splice(lo, 0, item);
    if (S.view === viewOf(room)) {
      const next = a[lo + 1];
      $('messages').insertBefore(item.el, next ? next.el : firstOutboxEl());
    }
  }

  function firstOutboxEl() {
    return $('messages').querySelector(':scope > .outbox');
  }

  // Adds messages not seen yet; returns how many were new.
  function addMessages(room, list) {
    for (const m of list) {
      if (typeof m.seq === 'number') room.lastSeq = Math.max(room.lastSeq, m.seq);
      if (typeof m.id === 'string') {
        const p = S.outbox.get(m.id);
        if (p && p.kind === 'room' && p.room === room.name) removeOutbox(p);
      }
    }
    return insertMessages(room, list);
  }

  function insertMessages(room, list) {
    const fresh = list.filter((m) => typeof m.seq === 'number' && m.seq > 0 && !room.msgs.has(m.seq));
    if (!fresh.length) return 0;
    keepScroll(viewOf(room), () => {
      for (const raw of fresh) {
        const m = {
          seq: raw.seq,
          from: String(raw.from ?? '?'),
          text: String(raw.text ?? ''),
          ts: raw.ts,
          id: typeof raw.id === 'string' ? raw.id : undefined,
        };
        room.msgs.set(m.seq, m);
        room.minSeq = Math.min(room.minSeq, m.seq);
        insertItem(room, { k: m.seq, n: 0, el: messageEl(m) });
      }
    });
    return fresh.length;
  }

  function addSystem(room, text, kind) {
    S.sysCounter++;
    const e = el('div', `sys ${kind || ''}`.trim());
    e.append(el('span', 'time', fmtTime(Date.now())), el('span', 'sys-text', text));
    keepScroll(viewOf(room), () => insertItem(room, { k: room.lastSeq, n: S.sysCounter, el: e }));
  }

  // A local notice in whatever is on screen (errors without a request, command help).
  function notice(text, isError) {
    const room = S.view === DIRECT ? S.direct : S.rooms.get(S.view);
    if (room) {
      addSystem(room, text, isError ? 'error' : 'info');
    } else {
      showHint(text, isError);
    }
  }

  function addDirectItem(d) {
    const e = el('div', 'msg direct');
    if (d.from === S.me) e.classList.add('mine');
    e.append(el('span', 'time', fmtTime(d.ts)));
    const who = el('span', 'from');
    const other = d.from === S.me ? d.to : d.from;
    who.append(nameButton(d.from === S.me ? 'you' : d.from, other), el('span', 'arrow', ' → '));
    who.append(nameButton(d.to === S.me ? 'you' : d.to, other));
    e.append(who, textEl(d.text));
    S.sysCounter++;
    S.direct.log.push({ from: d.from, to: d.to, text: d.text, ts: d.ts });
    keepScroll(DIRECT, () => insertItem(S.direct, { k: S.sysCounter, n: 0, el: e }));
  }

  function nameButton(label, target) {
    const b = el('button', 'name', label);
    b.type = 'button';
    b.style.color = nameColor(target || label);
    b.title = `direct message to ${target}`;
    b.addEventListener('click', () => startDirect(target));
    return b;
  }

  function textEl(text) {
    const t = el('span', 'text');
    t.append(richText(text));
    return t;
  }

  function messageEl(m) {
    const e = el('div', 'msg');
    e.dataset.seq = String(m.seq);
    if (m.id) e.dataset.id = m.id;
    if (m.from === S.me) e.classList.add('mine');
    else if (mentionsMe(m.text)) e.classList.add('mention');
    const time = el('span', 'time', fmtTime(m.ts));
    if (typeof m.ts === 'number') time.title = `${new Date(m.ts).toLocaleString()} · #${m.seq}`;
    const from = nameButton(m.from, m.from);
    from.classList.add('from');
    e.append(time, from, textEl(m.text));
    return e;
  }

  // Keeps what the user is reading in place while items are added above or below it, and
  // follows new items when the user was already at the bottom.
  function keepScroll(view, fn) {
    if (S.view !== view) return fn();
    const box = $('messages');
    const atBottom = isNearBottom();
    let anchor = null;
    let anchorTop = 0;
    if (!atBottom) {
      anchor = firstVisible(box);
      if (anchor) anchorTop = anchor.getBoundingClientRect().top;
    }
    const out = fn();
    if (atBottom) box.scrollTop = box.scrollHeight;
    else if (anchor && anchor.isConnected) box.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
    return out;
  }

  function isNearBottom() {
    const box = $('messages');
    return box.scrollHeight - box.scrollTop - box.clientHeight < NEAR_BOTTOM_PX;
  }

  function firstVisible(box) {
    const kids = box.children;
    const top = box.getBoundingClientRect().top;
    let lo = 0;
    let hi = kids.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (kids[mid].getBoundingClientRect().bottom <= top) lo = mid + 1;
      else hi = mid;
    }
    return kids[lo] || null;
  }

  function scrollToBottom() {
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
    $('jump').hidden = true;
  }

  // ---------------------------------------------------------------------------------------
  // Outbox: sends stay here, shown as pending, until acked; they are re-sent with the same id
  // after reconnects and on `unavailable`, which the server deduplicates.

  function queueSend(room, text) {
    const p = { id: randomId(), kind: 'room', room: room.name, text, state: 'queued', attempts: 0 };
    addOutbox(p);
    if (room.joined) transmit(p);
  }

  function queueDirect(to, text) {
    const p = { id: randomId(), kind: 'direct', to, text, state: 'queued', attempts: 0 };
    addOutbox(p);
    transmit(p);
  }

  function addOutbox(p) {
    if (utf8Len(p.text) > MAX_CLIENT_TEXT_BYTES) {
      p.state = 'failed';
      p.error = `too large: ${utf8Len(p.text)} bytes`;
      p.noRetry = true;
    }
    S.outbox.set(p.id, p);
    p.el = outboxEl(p);
    const view = p.kind === 'direct' ? DIRECT : p.room;
    if (S.view === view) {
      $('messages').append(p.el);
      scrollToBottom();
    }
  }

  function transmit(p) {
    if (p.state !== 'queued') return;
    let ref;
    if (p.kind === 'direct') {
      ref = request({ type: 'direct', to: p.to, text: p.text, id: p.id }, { kind: 'direct', id: p.id });
    } else {
      const room = S.rooms.get(p.room);
      if (!room || !room.joined) return;
      ref = request({ type: 'send', room: p.room, text: p.text, id: p.id }, { kind: 'send', id: p.id });
    }
    if (ref) {
      p.state = 'inflight';
      renderOutbox(p);
    }
  }

  function flushRoom(room) {
    for (const p of S.outbox.values()) {
      if (p.kind === 'room' && p.room === room.name) transmit(p);
    }
  }

  function flushDirects() {
    for (const p of S.outbox.values()) if (p.kind === 'direct') transmit(p);
  }

  function outboxError(p, code, detail) {
    if (RETRYABLE.has(code) && p.attempts < SEND_RETRIES) {
      p.attempts++;
      if (code === 'unavailable' && p.attempts >= 3) {
        // Still refused after a few seconds: this node may be cut off from the majority of the
        // cluster (it answers pings but refuses writes). Move to another node; the message is
        // re-sent there with the same id after re-joining.
        drop(S.conn, 4000);
      }
      p.state = 'waiting';
      p.error = code === 'unavailable' ? 'room unavailable, retrying…' : 'rate limited, retrying…';
      const delay = jitter(Math.min(BACKOFF_MAX_MS, 500 * 2 ** (p.attempts - 1)));
      p.timer = setTimeout(() => {
        if (!S.outbox.has(p.id) || p.state !== 'waiting') return;
        p.state = 'queued';
        retransmit(p);
      }, delay);
      renderOutbox(p);
      return;
    }
    if (code === 'not_joined' && p.kind === 'room' && p.attempts < SEND_RETRIES) {
      // The node forgot our membership (it restarted its session side): join again, then flush.
      p.attempts++;
      p.state = 'queued';
      const room = S.rooms.get(p.room);
      if (room && room.joined) {
        room.joined = false;
        sendJoin(room);
      }
      renderOutbox(p);
      return;
    }
    p.state = 'failed';
    p.noRetry = code === 'too_large';
    if (code === 'too_large') {
      p.error = `message too long (${detail || `the default limit is ${DEFAULT_TEXT_LIMIT_BYTES} bytes`})`;
    } else if (code === 'offline') {
      p.error = `${p.to} is offline`;
    } else if (RETRYABLE.has(code)) {
      p.error = code === 'unavailable' ? 'room still unavailable' : 'rate limited';
    } else {
      p.error = `${code}${detail ? ': ' + detail : ''}`;
    }
    renderOutbox(p);
  }

  function retransmit(p) {
    renderOutbox(p);
    transmit(p); // for a room not joined yet this waits: its `joined` flushes the outbox
  }

  function retry(p) {
    clearTimeout(p.timer);
    p.attempts = 0;
    p.error = null;
    p.state = 'queued';
    retransmit(p);
  }

  function removeOutbox(p) {
    clearTimeout(p.timer);
    S.outbox.delete(p.id);
    if (p.el) p.el.remove();
  }

  function outboxEl(p) {
    const e = el('div', 'msg outbox');
    e.dataset.id = p.id;
    p.statusEl = el('span', 'state');
    p.actionsEl = el('span', 'actions');
    e.append(el('span', 'time', fmtTime(Date.now())));
    if (p.kind === 'direct') {
      const who = el('span', 'from');
      who.append(el('span', 'name', 'you'), el('span', 'arrow', ' → '), nameButton(p.to, p.to));
      e.append(who);
    } else {
      const from = el('span', 'name from', S.me || S.user);
      from.style.color = nameColor(S.me || S.user);
      e.append(from);
    }
    e.append(textEl(p.text), p.statusEl, p.actionsEl);
    p.el = e;
    renderOutbox(p);
    return e;
  }

  function renderOutbox(p) {
    const failed = p.state === 'failed';
    p.el.classList.toggle('pending', !failed);
    p.el.classList.toggle('failed', failed);
    p.statusEl.textContent = failed ? `failed: ${p.error}` : p.error || (S.connected ? 'sending…' : 'waiting for connection…');
    p.actionsEl.replaceChildren();
    if (!failed) return;
    if (!p.noRetry) {
      const b = el('button', 'retry', 'Retry');
      b.type = 'button';
      b.addEventListener('click', () => retry(p));
      p.actionsEl.append(b);
    }
    const d = el('button', 'discard', p.noRetry ? 'Edit' : 'Discard');
    d.type = 'button';
    d.addEventListener('click', () => {
      removeOutbox(p);
      if (p.noRetry) {
        const input = $('message-input');
        input.value = p.kind === 'direct' ? `/msg ${p.to} ${p.text}` : p.text;
        autoGrow();
        input.focus();
      }
    });
    p.actionsEl.append(d);
  }

  // ---------------------------------------------------------------------------------------
  // Views

  function selectView(view) {
    const box = $('messages');
    const prev = S.view === DIRECT ? S.direct : S.rooms.get(S.view);
    if (prev) prev.scroll = isNearBottom() ? null : box.scrollTop;
    S.view = view;
    saveView();
    const room = view === DIRECT ? S.direct : S.rooms.get(view);
    if (room) room.unread = 0;
    renderView();
    renderRoomList();
    if (room && room !== S.direct) {
      if (room.joined) requestWho(room);
      maybeLoadMore(room);
    }
    $('message-input').focus();
  }

  function renderView() {
    const box = $('messages');
    const room = S.view === DIRECT ? S.direct : S.rooms.get(S.view);
    box.replaceChildren();
    $('jump').hidden = true;
    if (!room) {
      const empty = el('div', 'empty');
      empty.append(
        el('p', null, 'You are not in any room yet.'),
        el('p', 'muted', 'Join one with the field on the left (try “lobby”), or type /msg NAME TEXT.'),
      );
      box.append(empty);
    } else {
      for (const item of room.items) box.append(item.el);
      const view = viewOf(room);
      for (const p of S.outbox.values()) {
        if ((p.kind === 'direct' ? DIRECT : p.room) === view) {
          renderOutbox(p);
          box.append(p.el);
        }
      }
      if (room.scroll === null) box.scrollTop = box.scrollHeight;
      else box.scrollTop = room.scroll;
    }
    renderViewInfo();
    renderMembers();
    updatePlaceholder();
  }

  function renderViewInfo() {
    const title = $('view-title');
    const info = $('view-info');
    if (S.view === DIRECT) {
      title.textContent = 'Direct messages';
      info.textContent = 'click a name or type /msg NAME TEXT';
      return;
    }
    const room = S.rooms.get(S.view);
    if (!room) {
      title.textContent = 'No room';
      info.textContent = '';
      return;
    }
    title.textContent = `#${room.name}`;
    const parts = [];
    if (room.members.length) parts.push(`${room.members.length} member${room.members.length === 1 ? '' : 's'}`);
    if (!room.joined) parts.push(S.connected ? 'joining…' : 'offline');
    if (room.loadingOlder) parts.push('loading older messages…');
    else if (room.historyDone && room.msgs.size) parts.push('all history loaded');
    info.textContent = parts.join(' · ');
  }

  function renderMembers() {
    const list = $('members');
    list.replaceChildren();
    const room = S.rooms.get(S.view);
    if (!room) return;
    for (const u of room.members) {
      const li = el('li', 'member');
      li.dataset.user = u;
      const b = el('button', 'name', u === S.me ? `${u} (you)` : u);
      b.type = 'button';
      b.style.color = nameColor(u);
      b.title = `direct message to ${u}`;
      b.addEventListener('click', () => startDirect(u));
      li.append(b);
      list.append(li);
    }
  }

  function renderRoomList() {
    const list = $('rooms');
    list.replaceChildren();
    for (const room of S.rooms.values()) {
      const li = el('li', 'room');
      li.dataset.room = room.name;
      if (S.view === room.name) li.classList.add('active');
      if (!room.joined) li.classList.add('not-joined');
      const b = el('button', 'room-name');
      b.type = 'button';
      b.append(el('span', 'hash', '#'), el('span', 'label', room.name));
      if (room.unread) b.append(el('span', 'unread', room.unread > 99 ? '99+' : room.unread));
      b.addEventListener('click', () => selectView(room.name));
      const x = el('button', 'leave', '×');
      x.type = 'button';
      x.title = `Leave #${room.name}`;
      x.setAttribute('aria-label', `Leave ${room.name}`);
      x.addEventListener('click', () => leaveRoom(room.name));
      li.append(b, x);
      list.append(li);
    }
    if (!S.rooms.size) list.append(el('li', 'muted none', 'no rooms'));

    const dl = $('direct-entry');
    dl.replaceChildren();
    if (S.direct) {
      const li = el('li', 'room direct-room');
      li.dataset.room = DIRECT;
      if (S.view === DIRECT) li.classList.add('active');
      const b = el('button', 'room-name');
      b.type = 'button';
      b.append(el('span', 'hash', '@'), el('span', 'label', 'Direct'));
      if (S.direct.unread) b.append(el('span', 'unread', S.direct.unread > 99 ? '99+' : S.direct.unread));
      b.addEventListener('click', () => selectView(DIRECT));
      li.append(b);
      dl.append(li);
    }

    let total = S.direct ? S.direct.unread : 0;
    for (const r of S.rooms.values()) total += r.unread;
    document.title = total ? `(${total}) chat` : 'chat';
  }

  function setStatus(kind, text) {
    $('status').textContent = text;
    $('status-dot').className = `status-dot ${kind}`;
    document.body.dataset.connection = kind;
    for (const p of S.outbox.values()) if (p.state !== 'failed') renderOutbox(p);
    if (S.view !== null) renderViewInfo();
  }

  function showHint(text, isError) {
    const h = $('send-hint');
    h.textContent = text;
    h.classList.toggle('error', !!isError);
  }

  function updatePlaceholder() {
    const input = $('message-input');
    if (S.view === DIRECT) {
      input.placeholder = S.directTarget
        ? `Message ${S.directTarget}… (or /msg NAME TEXT)`
        : 'Type /msg NAME TEXT';
    } else if (S.rooms.has(S.view)) {
      input.placeholder = `Message #${S.view}… (Enter sends, Shift+Enter new line, /help)`;
    } else {
      input.placeholder = '/join ROOM or /msg NAME TEXT';
    }
  }

  function startDirect(user) {
    if (!USER_RE.test(user)) return;
    S.directTarget = user;
    const input = $('message-input');
    input.value = `/msg ${user} `;
    autoGrow();
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  }

  // ---------------------------------------------------------------------------------------
  // Input: the send box and its commands

  const HELP = [
    '/msg NAME TEXT — direct message (also: click a name)',
    '/join ROOM — join a room',
    '/leave [ROOM] — leave this or another room',
    '/who — refresh the member list',
    '//text — send a message starting with /',
  ];

  function submitInput() {
    const input = $('message-input');
    const raw = input.value;
    if (!raw.trim()) return;
    if (runInput(raw)) {
      input.value = '';
      autoGrow();
      updateByteHint();
    }
  }

  // Returns true when the input was consumed (else it stays for the user to fix).
  function runInput(raw) {
    showHint('', false);
    if (raw.startsWith('/') && !raw.startsWith('//')) {
      const m = raw.match(/^\/(\S+)\s*([\s\S]*)$/);
      const cmd = m ? m[1].toLowerCase() : '';
      const rest = m ? m[2] : '';
      switch (cmd) {
        case 'msg':
        case 'dm':
        case 'w': {
          const d = rest.match(/^(\S+)\s+([\s\S]+)$/);
          if (!d || !d[2].trim()) {
            showHint('usage: /msg NAME TEXT', true);
            return false;
          }
          if (!USER_RE.test(d[1])) {
            showHint('user names are 1–32 characters of A-Z a-z 0-9 _ . -', true);
            return false;
          }
          S.directTarget = d[1];
          if (S.view !== DIRECT) selectView(DIRECT);
          queueDirect(d[1], d[2]);
          return true;
        }
        case 'join': {
          const name = rest.trim().replace(/^#/, '');
          if (!ROOM_RE.test(name)) {
            showHint('room names are 1–64 characters of A-Z a-z 0-9 _ . : -', true);
            return false;
          }
          joinRoom(name);
          return true;
        }
        case 'leave':
        case 'part': {
          const name = rest.trim().replace(/^#/, '') || S.view;
          if (!S.rooms.has(name)) {
            showHint('not in that room', true);
            return false;
          }
          leaveRoom(name);
          return true;
        }
        case 'who': {
          const room = S.rooms.get(S.view);
          if (room) requestWho(room);
          return true;
        }
        case 'help':
          for (const line of HELP) notice(line, false);
          if (!S.rooms.has(S.view) && S.view !== DIRECT) showHint(HELP.join(' · '), false);
          return true;
        default:
          showHint(`unknown command /${cmd} — try /help`, true);
          return false;
      }
    }
    const text = raw.startsWith('//') ? raw.slice(1) : raw;
    if (S.view === DIRECT) {
      if (!S.directTarget) {
        showHint('type /msg NAME TEXT, or click a name', true);
        return false;
      }
      queueDirect(S.directTarget, text);
      return true;
    }
    const room = S.rooms.get(S.view);
    if (!room) {
      showHint('join a room first', true);
      return false;
    }
    queueSend(room, text);
    return true;
  }

  function autoGrow() {
    const input = $('message-input');
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  function updateByteHint() {
    const n = utf8Len($('message-input').value);
    const h = $('send-hint');
    if (n > DEFAULT_TEXT_LIMIT_BYTES * 0.8) {
      h.textContent = `${n} bytes (the server's default limit is ${DEFAULT_TEXT_LIMIT_BYTES})`;
      h.classList.toggle('error', n > DEFAULT_TEXT_LIMIT_BYTES);
    } else if (/ bytes \(the server/.test(h.textContent)) {
      h.textContent = '';
      h.classList.remove('error');
    }
  }

  function startSession(user, token) {
    S.active = true;
    S.user = user;
    S.token = token;
    S.me = user;
    S.everConnected = false;
    S.attempt = 0;
    S.rooms.clear();
    S.outbox.clear();
    S.direct = newRoom(DIRECT);
    S.direct.log = [];
    S.directTarget = null;
    loadRooms(user);
    initNodes();
    $('login-view').hidden = true;
    $('app').hidden = false;
    selectView(firstView());
    connect();
  }

  function wireUi() {
    const params = new URLSearchParams(location.search);
    S.tokenUrl = params.get('token_url') || '';
    $('user').value = params.get('user') || store.get('chat.user', '') || '';
    try {
      $('token').value = sessionStorage.getItem('chat.token') || '';
    } catch {
      // sessionStorage may be disabled.
    }

    $('login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const user = $('user').value.trim();
      const token = $('token').value.trim();
      const err = $('login-error');
      if (!USER_RE.test(user)) {
        err.textContent = 'User names are 1–32 characters of A-Z a-z 0-9 _ . -';
        $('user').focus();
        return;
      }
      err.textContent = '';
      store.set('chat.user', user);
      try {
        if (token) sessionStorage.setItem('chat.token', token);
        else sessionStorage.removeItem('chat.token');
      } catch {
        // sessionStorage may be disabled.
      }
      startSession(user, token);
    });

    $('logout').addEventListener('click', logout);

    $('join-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const input = $('room-input');
      const name = input.value.trim().replace(/^#/, '');
      const err = $('join-error');
      if (!ROOM_RE.test(name)) {
        err.textContent = 'Room names: 1–64 of A-Z a-z 0-9 _ . : -';
        return;
      }
      err.textContent = '';
      input.value = '';
      joinRoom(name);
    });
    $('room-input').addEventListener('input', () => {
      $('join-error').textContent = '';
    });

    $('send-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      submitInput();
    });
    const input = $('message-input');
    input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
        ev.preventDefault();
        submitInput();
      }
    });
    input.addEventListener('input', () => {
      autoGrow();
      updateByteHint();
    });

    const box = $('messages');
    box.addEventListener('scroll', () => {
      if (isNearBottom()) $('jump').hidden = true;
      if (box.scrollTop < NEAR_TOP_PX) {
        const room = S.rooms.get(S.view);
        if (room) loadOlder(room);
      }
    });
    // Scrolling up with no scrollbar fires no `scroll` event.
    box.addEventListener('wheel', (ev) => {
      if (ev.deltaY < 0 && box.scrollTop < NEAR_TOP_PX) {
        const room = S.rooms.get(S.view);
        if (room) loadOlder(room);
      }
    }, { passive: true });
    $('jump').addEventListener('click', scrollToBottom);
  }

  // ---------------------------------------------------------------------------------------
  // Debug hook for automated browser tests

  window.chatDebug = {
    state() {
      const rooms = {};
      for (const r of S.rooms.values()) {
        rooms[r.name] = {
          lastSeq: r.lastSeq,
          joined: r.joined,
          unread: r.unread,
          members: [...r.members],
          messages: [...r.msgs.values()]
            .sort((a, b) => a.seq - b.seq)
            .map((m) => ({ seq: m.seq, from: m.from, text: m.text, id: m.id === undefined ? null : m.id })),
          pending: [...S.outbox.values()]
            .filter((p) => p.kind === 'room' && p.room === r.name)
            .map((p) => ({ id: p.id, text: p.text, state: p.state, error: p.error || null })),
        };
      }
      return {
        connected: S.connected,
        node: S.node,
        user: S.me,
        session: S.session,
        nodes: S.nodes.map((n) => n.host),
        view: S.view,
        rooms,
        direct: S.direct ? S.direct.log.map((d) => ({ ...d })) : [],
        pendingDirect: [...S.outbox.values()]
          .filter((p) => p.kind === 'direct')
          .map((p) => ({ id: p.id, to: p.to, text: p.text, state: p.state, error: p.error || null })),
      };
    },
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', wireUi);
  else wireUi();
})();
