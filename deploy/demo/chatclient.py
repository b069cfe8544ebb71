#!/usr/bin/env python3
"""Client side of the failover demos (deploy/demo-*): chatters, cluster probes and the checks.

Everything a demo claims is measured here, from what clients saw, and written down in a
*ledger*: one JSON object per line (`"ev"`: connected, disconnected, joined, ack, error, stall,
summary…), each with the wall-clock time `t` (seconds since the epoch, the clock of `date +%s.%N`,
so the bash scripts can mark their own events on the same time line).

Subcommands (`chatclient.py CMD --help` for the flags):

  status URL...        each node's view: members up/down, quorum
  wait URL...          poll the nodes' views until a condition holds on all of them; prints the
                       elapsed seconds on stdout (progress on stderr), exits 1 on timeout
  owner URL... ROOM    the room's owner and replicas, once every node given agrees
  owners               the same for many rooms, one line each
  watch URL...         record every change of the nodes' views (and rooms) until SIGTERM, for
                       `wait --watched`: the moment a condition first held, to the poll interval
  chat                 clients that join rooms and send until SIGTERM, each on a home node with
                       others to fail over to (protocol.md §4: rejoin with `since`, retry with
                       the same `id`); then they drain their pending send and write a summary
  acks                 wait until clients have N acks after a time; prints when acks resumed
                       and the longest pause between two acks of a client
  count                count ledger events (acks, errors) of clients in a time window
  verify               the rooms' history through every node against every ledger: nothing
                       acked lost or duplicated, seq contiguous, every client saw every message

URLs are node HTTP addresses (`http://127.0.0.1:8081`) or bare host ports (`8081`).
Needs `websockets` (pip install websockets).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

try:
    import websockets
except ImportError:  # the demo scripts install it first; `chat` and `verify` say so if not
    websockets = None

# A request with no reply after this long is sent again (same `id`): the node itself answers
# `unavailable` after request-timeout-ms (5 s) at the latest.
REPLY_TIMEOUT_S = 8.0
# WebSocket pings: a connection whose node stops answering them for this long (a paused or
# cut-off node) is dropped and the client fails over to its next node.
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 3.0
# Pause after `unavailable` before retrying the same message.
RETRY_BACKOFF_S = 0.2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_url(spec: str) -> str:
    """`8081` -> http://127.0.0.1:8081; full URLs are kept (without a trailing slash)."""
    spec = spec.strip()
    if spec.isdigit():
        return f"http://127.0.0.1:{spec}"
    if "://" not in spec:
        spec = "http://" + spec
    return spec.rstrip("/")


def ws_url(base: str, user: str) -> str:
    url = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + f"/ws?user={user}"
    secret = os.environ.get("CHAT_AUTH_SECRET")
    if secret:
        # The compose cluster requires tokens (deploy/init-env); a fresh one per connection.
        url += "&token=" + mint_token(user, secret)
    return url


def mint_token(user: str, secret: str, seconds: int = 3600) -> str:
    """An HS256 token for `user` (as deploy/mint-token makes)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": user, "iat": now, "exp": now + seconds}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256)
    return f"{header}.{claims}.{b64(signature.digest())}"


def http_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def get_view(base: str):
    """The node's /cluster answer, or None when it does not answer."""
    try:
        return http_json(base + "/cluster")
    except (OSError, ValueError, urllib.error.URLError):
        return None


def get_room(base: str, room: str):
    try:
        return http_json(f"{base}/cluster/rooms/{room}")
    except (OSError, ValueError, urllib.error.URLError):
        return None


def describe_view(base: str, view) -> str:
    if view is None:
        return f"{base}: no answer"
    members = " ".join(f"{m['name']}={m['status']}" for m in view.get("members", []))
    return f"{view.get('node')} ({base}): {members} quorum={str(view.get('quorum')).lower()}"


# --------------------------------------------------------------------------------------------
# status, wait, owner


def cmd_status(args) -> int:
    for spec in args.urls:
        base = base_url(spec)
        print(describe_view(base, get_view(base)))
        for room in args.room or []:
            print(f"    room {room}: {get_room(base, room)}")
    return 0


def view_ok(args, base: str, view, room_view) -> tuple[bool, str]:
    """Whether one node's view meets every condition of `wait`, and why not."""
    if view is None:
        return False, "no answer"
    members = {m["name"]: m["status"] for m in view.get("members", [])}
    up = sorted(n for n, s in members.items() if s == "up")
    if args.up is not None and len(up) != args.up:
        return False, f"{len(up)} up ({','.join(up)}), want {args.up}"
    if args.members is not None and len(members) != args.members:
        return False, f"{len(members)} members ({','.join(sorted(members))}), want {args.members}"
    for name in args.down or []:
        if members.get(name) == "up":
            return False, f"{name} still up"
    for name in args.is_up or []:
        if members.get(name) != "up":
            return False, f"{name} is {members.get(name, 'absent')}"
    for name in args.absent or []:
        if name in members:
            return False, f"{name} still listed ({members[name]})"
    if args.quorum is not None:
        want = args.quorum == "yes"
        if bool(view.get("quorum")) != want:
            return False, f"quorum={str(view.get('quorum')).lower()}"
    if args.room:
        if room_view is None:
            return False, f"no answer for room {args.room}"
        owner = room_view.get("owner")
        if args.owner and owner != args.owner:
            return False, f"{args.room} owned by {owner}, want {args.owner}"
        if args.owner_not and owner == args.owner_not:
            return False, f"{args.room} still owned by {owner}"
    return True, "ok"


def cmd_wait(args) -> int:
    bases = [base_url(u) for u in args.urls]
    start = args.since if args.since is not None else time.time()
    deadline = time.time() + args.timeout
    label = args.label or "condition"
    last = {}
    while True:
        results = []
        owners = set()
        for base in bases:
            view = get_view(base)
            room_view = get_room(base, args.room) if args.room and view is not None else None
            if room_view is not None:
                owners.add(room_view.get("owner"))
            ok, why = view_ok(args, base, view, room_view)
            results.append(ok)
            last[base] = (view, why)
        if all(results) and (not args.room or len(owners) == 1):
            elapsed = time.time() - start
            if args.watched:
                held = first_time_held(args, bases, start)
                if held is not None and held - start <= elapsed:
                    log(f"    {label}: after {held - start:.2f} s (recorded by the watcher; "
                        f"this poll saw it after {elapsed:.2f} s)")
                    print(f"{held - start:.2f}")
                    return 0
            log(f"    {label}: after {elapsed:.2f} s")
            print(f"{elapsed:.2f}")
            return 0
        if time.time() >= deadline:
            log(f"    {label}: NOT reached within {args.timeout:.0f} s; last views:")
            for base, (view, why) in last.items():
                log(f"      {describe_view(base, view)}  [{why}]")
            return 1
        time.sleep(args.poll)


def cmd_owners(args) -> int:
    """Prints `ROOM OWNER REPLICA...` per room, once every node agrees on every room."""
    bases = [base_url(u) for u in args.url]
    deadline = time.time() + args.timeout
    while True:
        lines, disagree = [], []
        for room in args.room:
            answers = [get_room(b, room) for b in bases]
            placements = {(a["owner"], tuple(a.get("replicas", []))) if a else None for a in answers}
            if len(placements) != 1 or None in placements:
                disagree.append(room)
                continue
            owner, replicas = placements.pop()
            lines.append(" ".join([room, owner, *replicas]))
        if not disagree:
            print("\n".join(lines))
            return 0
        if time.time() >= deadline:
            log(f"owners: the nodes still disagree on {len(disagree)} room(s), e.g. {disagree[:3]}")
            return 1
        time.sleep(0.2)


def cmd_watch(args) -> int:
    """Polls every node's view (and rooms) until SIGTERM, recording each change with its time.

    One thread per node, so that a node that does not answer (paused) delays only itself.
    `wait --watched DIR` then finds, in these records, the first moment a condition held on
    every node: a precise figure, where its own polling only gives an upper bound.
    """
    import threading

    ledger = Ledger(args.ledger)
    lock = threading.Lock()
    stop = threading.Event()

    def poll(base: str):
        last = object()
        while not stop.is_set():
            view = get_view(base)
            rooms = {r: get_room(base, r) for r in args.room or []} if view is not None else {}
            state = (view, rooms)
            if state != last:
                with lock:
                    ledger.write("view", url=base, view=view, rooms=rooms)
                last = state
            stop.wait(args.interval)

    threads = [threading.Thread(target=poll, args=(base_url(u),), daemon=True) for u in args.urls]
    for t in threads:
        t.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(0.5)
    for t in threads:
        t.join(timeout=3)
    return 0


def first_time_held(args, bases: list[str], after: float):
    """The first time >= `after` at which the recorded views of every base met the condition."""
    events = [e for e in read_ledgers(args.watched) if e["ev"] == "view" and e["url"] in bases]
    state = {}
    for e in events:
        state[e["url"]] = e
        if e["t"] < after or len(state) < len(bases):
            continue
        owners = set()
        ok = True
        for base in bases:
            rec = state[base]
            room_view = rec.get("rooms", {}).get(args.room) if args.room else None
            if room_view is not None:
                owners.add(room_view.get("owner"))
            ok &= view_ok(args, base, rec["view"], room_view)[0]
        if ok and (not args.room or len(owners) == 1):
            return e["t"]
    # Held already when the watch began, or before `after`: check the state at `after`.
    return None


def cmd_owner(args) -> int:
    bases = [base_url(u) for u in args.urls]
    answers = [get_room(b, args.room) for b in bases]
    if any(a is None for a in answers):
        log(f"owner: a node did not answer for room {args.room}: {answers}")
        return 1
    placements = {(a["owner"], tuple(a.get("replicas", []))) for a in answers}
    if len(placements) != 1:
        log(f"owner: the nodes disagree on room {args.room}: {answers}")
        return 1
    owner, replicas = placements.pop()
    print(" ".join([owner, *replicas]))
    return 0


# --------------------------------------------------------------------------------------------
# the chatter


class Ledger:
    """Append-only JSON-lines file, flushed on every event so that other processes can read it."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, ev: str, **fields) -> None:
        record = {"t": round(time.time(), 4), "ev": ev, **fields}
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")


class Client:
    """One user on a home node, with the other nodes to fail over to, chatting in some rooms.

    It has at most one message in flight: it sends the next one only once the previous one is
    acknowledged, retrying it with the same `id` after `unavailable`, a timeout or a lost
    connection. It records every message event it receives, per room, to check that it saw
    every seq exactly once.
    """

    def __init__(self, user: str, bases: list[str], rooms: list[str], ledger: Ledger,
                 interval: float, run: str, failover: bool):
        self.user = user
        self.bases = bases
        self.rooms = rooms
        self.ledger = ledger
        self.interval = interval
        self.run = run
        self.failover = failover
        self.url_index = 0
        self.counter = 0
        self.pending: dict | None = None
        self.stopping = False
        self.stopping_t = None
        # Set once stopping with nothing pending; `finish` is set by the chatter when every
        # client has drained and the last messages had time to arrive.
        self.drained = asyncio.Event()
        self.finish = asyncio.Event()
        # Per room: the seq at the first join (messages after it must all arrive), and the
        # seqs received.
        self.base_seq: dict[str, int] = {}
        self.received: dict[str, Counter] = {r: Counter() for r in rooms}
        self.replies: dict[int, asyncio.Future] = {}
        self.next_ref = 0
        self.node = None

    def max_seen(self, room: str) -> int | None:
        seen = self.received[room]
        values = list(seen) + ([self.base_seq[room]] if room in self.base_seq else [])
        return max(values) if values else None

    def new_message(self) -> dict:
        self.counter += 1
        room = self.rooms[(self.counter - 1) % len(self.rooms)]
        return {
            "room": room,
            "text": f"{self.user} #{self.counter}",
            "id": f"{self.user}.{self.counter}.{self.run}",
            "first_t": time.time(),
            "attempts": 0,
        }

    async def request(self, ws, frame: dict, timeout: float):
        self.next_ref += 1
        ref = self.next_ref
        frame = {**frame, "ref": ref}
        fut = asyncio.get_running_loop().create_future()
        self.replies[ref] = fut
        try:
            await ws.send(json.dumps(frame))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.replies.pop(ref, None)

    async def reader(self, ws):
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    room = frame.get("room")
                    if room in self.received:
                        self.received[room][frame["seq"]] += 1
                    continue
                ref = frame.get("ref")
                if ref is not None and ref in self.replies and not self.replies[ref].done():
                    self.replies[ref].set_result(frame)
        finally:
            # Requests waiting for a reply learn at once that it will never come.
            for fut in self.replies.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection lost"))

    async def run_forever(self):
        # Until the chatter finishes: stays connected (reconnecting if need be) so that it keeps
        # receiving the room's messages while the other clients drain.
        while not self.finish.is_set():
            if self.stopping and self.pending is None:
                self.drained.set()
            base = self.bases[self.url_index]
            try:
                await self.session(base)
            except Exception as e:  # noqa: BLE001 - any failure: record it, fail over, go on
                self.ledger.write("disconnected", client=self.user, url=base,
                                  node=self.node, why=f"{type(e).__name__}: {e}"[:200])
            self.node = None
            if self.finish.is_set():
                break
            if self.failover:
                self.url_index = (self.url_index + 1) % len(self.bases)
            await asyncio.sleep(0.2)

    async def session(self, base: str):
        async with websockets.connect(
            ws_url(base, self.user),
            open_timeout=CONNECT_TIMEOUT_S,
            ping_interval=PING_INTERVAL_S,
            ping_timeout=PING_TIMEOUT_S,
            close_timeout=1,
        ) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
            self.node = welcome.get("node")
            self.ledger.write("connected", client=self.user, url=base, node=self.node)
            reader = asyncio.create_task(self.reader(ws))
            try:
                await self.join_all(ws, reader)
                await self.send_loop(ws, reader)
            finally:
                reader.cancel()
                try:
                    await reader
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - already recorded
                    pass

    def check_reader(self, reader):
        if reader.done():
            exc = reader.exception()
            raise exc if exc else ConnectionError("connection closed")

    async def join_all(self, ws, reader):
        for room in self.rooms:
            while True:
                self.check_reader(reader)
                frame = {"type": "join", "room": room}
                since = self.max_seen(room)
                if since is not None:
                    frame["since"] = since
                try:
                    reply = await self.request(ws, frame, REPLY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    self.ledger.write("stall", client=self.user, node=self.node, op="join", room=room)
                    continue
                if reply.get("type") == "joined":
                    if room not in self.base_seq:
                        self.base_seq[room] = reply["seq"]
                    self.ledger.write("joined", client=self.user, node=self.node, room=room,
                                      seq=reply["seq"], since=since)
                    break
                self.ledger.write("error", client=self.user, node=self.node, op="join",
                                  room=room, code=reply.get("code"))
                await asyncio.sleep(RETRY_BACKOFF_S)

    async def send_loop(self, ws, reader):
        while True:
            self.check_reader(reader)
            if self.pending is None:
                if self.stopping:
                    self.drained.set()
                    await self.finish.wait()
                    return
                self.pending = self.new_message()
            msg = self.pending
            msg["attempts"] += 1
            frame = {"type": "send", "room": msg["room"], "text": msg["text"], "id": msg["id"]}
            try:
                reply = await self.request(ws, frame, REPLY_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.ledger.write("stall", client=self.user, node=self.node, op="send",
                                  room=msg["room"], id=msg["id"])
                continue
            if reply.get("type") == "ack":
                now = time.time()
                self.ledger.write("ack", client=self.user, node=self.node, room=msg["room"],
                                  seq=reply["seq"], text=msg["text"], id=msg["id"],
                                  attempts=msg["attempts"],
                                  latency=round(now - msg["first_t"], 4))
                self.pending = None
                if self.interval > 0 and not self.stopping:
                    await asyncio.sleep(self.interval)
                continue
            code = reply.get("code")
            self.ledger.write("error", client=self.user, node=self.node, op="send",
                              room=msg["room"], id=msg["id"], code=code)
            if code == "not_joined":
                await self.join_all(ws, reader)
            elif code == "rate_limited":
                await asyncio.sleep(1.0)
            else:
                await asyncio.sleep(RETRY_BACKOFF_S)

    def summary(self):
        for room in self.rooms:
            seen = self.received[room]
            base = self.base_seq.get(room)
            top = max(seen) if seen else base
            missing = []
            if base is not None and top is not None:
                missing = [s for s in range(base + 1, top + 1) if s not in seen]
            dups = sorted(s for s, n in seen.items() if n > 1)
            self.ledger.write("summary", client=self.user, room=room, base=base, top=top,
                              received=sum(seen.values()), missing=missing[:50],
                              missing_count=len(missing), dups=dups[:50], dup_count=len(dups),
                              pending=self.pending["id"] if self.pending else None,
                              connected=self.node is not None, stopping_t=self.stopping_t)


async def chat_main(args) -> int:
    ledger = Ledger(args.ledger)
    rooms = args.rooms.split(",")
    clients = []
    for spec in args.client:
        user, _, urls = spec.partition("=")
        bases = [base_url(u) for u in urls.split(",") if u]
        clients.append(Client(user, bases, rooms, ledger, args.interval, args.run,
                              failover=len(bases) > 1))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ledger.write("started", clients=[c.user for c in clients], rooms=rooms, pid=os.getpid())
    tasks = [asyncio.create_task(c.run_forever()) for c in clients]
    await stop.wait()
    ledger.write("stopping")
    for c in clients:
        c.stopping = True
        c.stopping_t = time.time()
    try:
        await asyncio.wait_for(asyncio.gather(*(c.drained.wait() for c in clients)), args.drain)
    except asyncio.TimeoutError:
        ledger.write("drain_timeout", pending=[c.user for c in clients if c.pending])
    # Let the last fan-outs arrive before counting what every client received.
    await asyncio.sleep(1.5)
    for c in clients:
        c.summary()
        c.finish.set()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    except asyncio.TimeoutError:
        pass
    ledger.write("stopped")
    return 0


def cmd_chat(args) -> int:
    return asyncio.run(chat_main(args))


# --------------------------------------------------------------------------------------------
# reading ledgers


def read_ledgers(paths: list[str]) -> list[dict]:
    files = []
    for p in paths:
        files.extend(sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p])
    events = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    events.append(json.loads(line))
    events.sort(key=lambda e: e["t"])
    return events


def select(events, ev=None, clients=None, after=None, before=None, code=None, room=None):
    for e in events:
        if ev and e["ev"] != ev:
            continue
        if clients and e.get("client") not in clients:
            continue
        if after is not None and e["t"] <= after:
            continue
        if before is not None and e["t"] >= before:
            continue
        if code and e.get("code") != code:
            continue
        if room and e.get("room") != room:
            continue
        yield e


def cmd_count(args) -> int:
    events = read_ledgers(args.ledger)
    clients = set(args.clients.split(",")) if args.clients else None
    n = sum(1 for _ in select(events, args.ev, clients, args.after, args.before, args.code))
    print(n)
    return 0


def cmd_acks(args) -> int:
    """Waits until each client has `min` acks after `after`.

    Prints two figures: the longest time from `after` to a client's first ack after it, and the
    longest pause between two consecutive acks of a client from its last ack before `gap_from`
    (default: `after`) to its `min`-th ack after `after`: the outage as the client saw it,
    whatever the precision of the marks.
    """
    clients = args.clients.split(",")
    gap_from = args.gap_from if args.gap_from is not None else args.after
    deadline = time.time() + args.timeout
    while True:
        events = read_ledgers(args.ledger)
        per_client = defaultdict(list)
        for e in select(events, "ack", set(clients)):
            per_client[e["client"]].append(e)
        counts = {c: sum(1 for e in per_client[c] if e["t"] > args.after) for c in clients}
        if all(counts[c] >= args.min for c in clients):
            worst, worst_gap = 0.0, 0.0
            for c in clients:
                acks = per_client[c]
                after = [e for e in acks if e["t"] > args.after]
                first, last = after[0], after[args.min - 1]
                delay = first["t"] - args.after
                worst = max(worst, delay)
                before = [e for e in acks if e["t"] <= gap_from]
                span = ([before[-1]] if before else []) + [
                    e for e in acks if gap_from < e["t"] <= last["t"]]
                gap, where = 0.0, None
                for a, b in zip(span, span[1:]):
                    if b["t"] - a["t"] > gap:
                        gap, where = b["t"] - a["t"], (a, b)
                worst_gap = max(worst_gap, gap)
                pause = ""
                if where:
                    a, b = where
                    pause = (f"; longest pause between two of its acks {gap:.2f} s (seq {a['seq']} "
                             f"via {a['node']} -> seq {b['seq']} via {b['node']})")
                log(f"    {c}: first ack {delay:.2f} s after the mark (through {first['node']}, seq "
                    f"{first['seq']}, {first['attempts']} attempt(s)){pause}, {counts[c]} acks since")
            print(f"{worst:.2f} {worst_gap:.2f}")
            return 0
        if time.time() >= deadline:
            for c in clients:
                log(f"    {c}: only {counts[c]} acks after the mark within {args.timeout:.0f} s")
            return 1
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# verify


async def fetch_history(base: str, room: str) -> list[dict]:
    """The whole history of `room` through the node at `base` (pages of 500, newest first)."""
    deadline = time.time() + 30
    async with websockets.connect(ws_url(base, "verifier"), open_timeout=CONNECT_TIMEOUT_S,
                                  ping_interval=None) as ws:
        await ws.recv()  # welcome
        pages: list[list[dict]] = []
        before = None
        ref = 0
        while True:
            ref += 1
            frame = {"type": "history", "ref": ref, "room": room, "limit": 500}
            if before is not None:
                frame["before"] = before
            await ws.send(json.dumps(frame))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S))
                if reply.get("ref") == ref:
                    break
            if reply.get("type") == "error":
                if time.time() > deadline:
                    raise RuntimeError(f"history of {room} through {base}: {reply}")
                await asyncio.sleep(0.5)
                continue
            page = reply["messages"]
            pages.append(page)
            if not page:
                break
            before = page[0]["seq"]
            if before <= 1:
                break
        out = []
        for page in reversed(pages):
            out.extend(page)
        return out


def verify_room(room: str, histories: dict[str, list[dict]], events: list[dict]):
    """Every failed check, as sentences: (about the stored history, about what clients received)."""
    failures = []
    delivery = []
    bases = list(histories)
    reference = histories[bases[0]]
    for base in bases[1:]:
        if [(m["seq"], m["text"]) for m in histories[base]] != [(m["seq"], m["text"]) for m in reference]:
            failures.append(f"history through {base} differs from through {bases[0]}")
    seqs = [m["seq"] for m in reference]
    if seqs != list(range(1, len(seqs) + 1)):
        dup = [s for s, n in Counter(seqs).items() if n > 1]
        holes = sorted(set(range(1, (max(seqs) if seqs else 0) + 1)) - set(seqs))
        failures.append(f"seqs not contiguous from 1: {len(seqs)} messages, duplicated seqs "
                        f"{dup[:10]}, missing seqs {holes[:10]}")
    by_seq = {m["seq"]: m for m in reference}
    text_count = Counter(m["text"] for m in reference)
    acks = list(select(events, "ack", room=room))
    acked_texts = set()
    for a in acks:
        m = by_seq.get(a["seq"])
        if m is None or m["text"] != a["text"] or m.get("id") != a["id"]:
            failures.append(f"acked {a['text']!r} (seq {a['seq']}, via {a['node']}) is not at seq "
                            f"{a['seq']} in history (found {m and m['text']!r})")
        acked_texts.add(a["text"])
    for text in acked_texts:
        if text_count[text] != 1:
            failures.append(f"acked {text!r} appears {text_count[text]} times in history")
    dup_texts = [t for t, n in text_count.items() if n > 1 and t not in acked_texts]
    if dup_texts:
        failures.append(f"unacknowledged messages stored twice: {dup_texts[:10]}")
    # Clients retry every message (same id) until it is acknowledged, so every stored message
    # must have been acknowledged in the end, unless a client gave up draining.
    if not any(True for _ in select(events, "drain_timeout")):
        unacked = [m["text"] for m in reference if m["text"] not in acked_texts]
        if unacked:
            failures.append(f"{len(unacked)} stored message(s) never acknowledged to their "
                            f"sender: {unacked[:10]}")
    seen_ack = defaultdict(set)
    for a in acks:
        seen_ack[a["text"]].add(a["seq"])
    for text, s in seen_ack.items():
        if len(s) > 1:
            failures.append(f"{text!r} acked with different seqs {sorted(s)}")
    for s in select(events, "summary", room=room):
        who = f"client {s['client']}"
        if s["dup_count"]:
            delivery.append(f"{who} received seqs more than once: {s['dups']}")
        if s["missing_count"]:
            delivery.append(f"{who} never received {s['missing_count']} message(s) between its "
                            f"join (seq {s['base']}) and seq {s['top']}: seqs {s['missing']}")
        # It stayed connected for a while after it stopped sending: by then it must have
        # received every message acknowledged (to anyone) before that moment.
        due = max((a["seq"] for a in acks if a["t"] <= s["stopping_t"]), default=0)
        if s["connected"] and (s["top"] or 0) < due:
            delivery.append(f"{who} received up to seq {s['top']} only, but seq {due} was "
                            f"acknowledged before it stopped")
        if not s["connected"]:
            delivery.append(f"{who} was not connected when it stopped")
    return failures, delivery


async def verify_main(args) -> int:
    """Exit status: 1 = the stored history is wrong (loss, duplicate, hole, nodes disagree),
    2 = a client did not receive every message exactly once, 4 = a history could not be read;
    or'ed together."""
    events = read_ledgers(args.ledger)
    bases = [base_url(u) for u in args.url]
    status = 0
    for room in args.room:
        histories = {}
        for base in bases:
            try:
                histories[base] = await fetch_history(base, room)
            except Exception as e:  # noqa: BLE001 - report any failure as a failed check
                log(f"  room {room}: cannot read history through {base}: {e}")
                status |= 4
        if not histories:
            continue
        failures, delivery = verify_room(room, histories, events)
        ref = next(iter(histories.values()))
        acks = list(select(events, "ack", room=room))
        attempts = sum(a["attempts"] for a in acks)
        errors = Counter(e.get("code") for e in select(events, "error", room=room))
        verdict = "ok" if not failures and not delivery else "FAIL"
        if not args.quiet or failures or delivery:
            log(f"  room {room}: {len(ref)} messages (seq 1..{ref[-1]['seq'] if ref else 0}), "
                f"{len(acks)} acked ({attempts - len(acks)} retries), "
                f"errors {dict(errors) or 'none'}, read through {len(histories)} node(s): {verdict}")
        for f in failures:
            log(f"    FAIL (history): {f}")
        for f in delivery:
            log(f"    FAIL (delivery): {f}")
        status |= (1 if failures else 0) | (2 if delivery else 0)
    return status


def cmd_verify(args) -> int:
    return asyncio.run(verify_main(args))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("status", help="print each node's view")
    p.add_argument("urls", nargs="+")
    p.add_argument("--room", action="append")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait until every node's view meets the conditions")
    p.add_argument("urls", nargs="+")
    p.add_argument("--up", type=int, help="exactly this many members up")
    p.add_argument("--members", type=int, help="exactly this many members listed")
    p.add_argument("--down", action="append", help="this member is not up")
    p.add_argument("--is-up", action="append", help="this member is up")
    p.add_argument("--absent", action="append", help="this member is not listed at all")
    p.add_argument("--quorum", choices=["yes", "no"])
    p.add_argument("--room", help="with --owner / --owner-not; also requires all nodes to agree")
    p.add_argument("--owner")
    p.add_argument("--owner-not")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--poll", type=float, default=0.1)
    p.add_argument("--since", type=float, help="measure from this time (seconds since epoch)")
    p.add_argument("--label")
    p.add_argument("--watched", action="append",
                   help="ledger (file or dir) of a `watch`: report the moment it recorded")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("watch", help="record every change of the nodes' views until SIGTERM")
    p.add_argument("urls", nargs="+")
    p.add_argument("--ledger", required=True)
    p.add_argument("--room", action="append")
    p.add_argument("--interval", type=float, default=0.05)
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("owner", help="print the room's owner and replicas (all nodes agreeing)")
    p.add_argument("urls", nargs="+")
    p.add_argument("room")
    p.set_defaults(func=cmd_owner)

    p = sub.add_parser("owners", help="print ROOM OWNER REPLICAS per room, all nodes agreeing")
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--room", action="append", required=True)
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(func=cmd_owners)

    p = sub.add_parser("chat", help="run chatting clients until SIGTERM")
    p.add_argument("--ledger", required=True, help="JSON-lines file to append events to")
    p.add_argument("--rooms", required=True, help="comma-separated rooms every client joins")
    p.add_argument("--client", action="append", required=True,
                   help="USER=URL[,URL...]: home node first, then the nodes to fail over to")
    p.add_argument("--interval", type=float, default=0.1, help="pause after each ack (s)")
    p.add_argument("--drain", type=float, default=30, help="time to get pending sends acked")
    p.add_argument("--run", default=str(int(time.time())), help="tag making message ids unique")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("acks", help="wait until clients have acks after a time")
    p.add_argument("--ledger", action="append", required=True, help="file or directory")
    p.add_argument("--clients", required=True)
    p.add_argument("--after", type=float, required=True)
    p.add_argument("--min", type=int, default=3)
    p.add_argument("--gap-from", type=float, help="measure pauses from here (default: --after)")
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(func=cmd_acks)

    p = sub.add_parser("count", help="count ledger events")
    p.add_argument("--ledger", action="append", required=True)
    p.add_argument("--ev", required=True)
    p.add_argument("--clients")
    p.add_argument("--code")
    p.add_argument("--after", type=float)
    p.add_argument("--before", type=float)
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("verify", help="check the rooms' history against the ledgers")
    p.add_argument("--ledger", action="append", required=True)
    p.add_argument("--room", action="append", required=True)
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--quiet", action="store_true", help="print only the rooms that fail")
    p.set_defaults(func=cmd_verify)

    args = parser.parse_args()
    if args.cmd in ("chat", "verify") and websockets is None:
        log("chatclient: the Python package `websockets` is missing (pip install websockets)")
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
