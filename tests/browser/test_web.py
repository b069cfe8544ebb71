#!/usr/bin/env python3
"""The web chat client (node/src/gateway/web) in real headless Chromium browsers.

Starts its own `chat-node` processes (target/release/chat-node, or $CHAT_NODE_BIN) on free
loopback ports with temporary data directories, then checks:

1. one node, two browsers (alice, bob): login, joining `lobby` through the UI, a message typed
   and sent with Enter reaches the other page and is shown acknowledged, a two-line reply with
   HTML in it arrives as plain text, presence in the member lists, older history loaded by
   scrolling up (120 messages pre-loaded by a WebSocket client), a direct message from the UI;
2. failover: a 3-node cluster (with 2, the survivor of a crash would have no majority and
   refuse writes), carol's page served by n1 with `?nodes=n1,n2`, erin's page served by n1
   without it (it must learn the others from /cluster, i.e. `--public-url`), and dave, a
   WebSocket client on n2, in a room owned by n1. n1 is SIGKILLed; carol types at once and
   dave keeps sending; both pages must reconnect by themselves (carol to n2), show every
   message exactly once in seq order (the cluster's history), with no pending entry left, and a
   message typed after the failover must be acknowledged and reach dave and erin.

Exit code 0 when every check passes; otherwise 1 with the failed check, the page state, the
browser console and the tail of every node's log. Waiting is always polling with a deadline.

    python3 tests/browser/test_web.py          (from any directory)
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("CHAT_NODE_BIN", ROOT / "target" / "release" / "chat-node"))
COOKIE = "browser-test-cookie"

# Deadlines. The node's failure timeout is its default, 3000 ms; a page reconnects within a few
# hundred ms of its socket closing, then retries its joins with backoff while the room fails over.
START_TIMEOUT = 20.0
FORM_TIMEOUT = 20.0
UI_TIMEOUT = 10.0
FAILOVER_TIMEOUT = 25.0
REQUEST_TIMEOUT = 10.0

T0 = time.monotonic()
CHECKS = 0


class CheckFailed(Exception):
    """A check of the test did not hold."""


def log(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {text}", flush=True)


def passed(text: str) -> None:
    global CHECKS
    CHECKS += 1
    log(f"ok   {text}")


def expect(cond: bool, text: str) -> None:
    if not cond:
        raise CheckFailed(text)


# ---------------------------------------------------------------------------------------------
# Node processes


def reserve_port(ip: str, udp: bool) -> tuple[int, list[socket.socket]]:
    """A port free on `ip` (for TCP, and UDP too when `udp`), held by the returned sockets."""
    for _ in range(100):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind((ip, 0))
        port = tcp.getsockname()[1]
        held = [tcp]
        if udp:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.bind((ip, port))
            except OSError:
                tcp.close()
                u.close()
                continue
            held.append(u)
        return port, held
    raise RuntimeError(f"no free port on {ip}")


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the `finally` of main() still kills the nodes


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Node:
    """One `chat-node` child process on `ip`, its log in the temp dir."""

    def __init__(self, name: str, ip: str, workdir: Path, cluster: bool) -> None:
        self.name = name
        self.ip = ip
        self.http_port, self._held = reserve_port(ip, udp=False)
        self.cluster_port = None
        if cluster:
            self.cluster_port, held = reserve_port(ip, udp=True)
            self._held += held
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"{self.ip}:{self.http_port}"

    @property
    def cluster_addr(self) -> str:
        return f"{self.ip}:{self.cluster_port}"

    def start(self, extra: list[str]) -> None:
        args = [
            str(BINARY), "--name", self.name, "--listen", self.http,
            "--data-dir", str(self.data_dir), "--log-format", "json", *extra,
        ]
        for s in self._held:  # released just before the child binds them
            s.close()
        self._held = []
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
                preexec_fn=die_with_parent,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> tuple[int, str]:
        try:
            return http_get(f"http://{self.http}/healthz", timeout=1.0)
        except OSError as e:
            return 0, str(e)

    def wait_healthy(self, deadline: float, members: int = 1) -> None:
        last = (0, "")
        while time.monotonic() < deadline:
            expect(self.alive(), f"node {self.name} exited with {self.proc.returncode}")
            last = self.health()
            if last[0] == 200 and json.loads(last[1]).get("members") == members:
                return
            time.sleep(0.05)
        raise CheckFailed(f"node {self.name} not healthy with {members} members: "
                          f"last /healthz {last}")

    def kill(self) -> None:
        """SIGKILL by pid (no grace: this is the crash being tested, and the clean-up)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the node's JSON log, condensed to time, level, message, fields."""
        try:
            raw = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as e:
            return f"(no log: {e})"
        out = []
        for line in raw:
            try:
                rec = json.loads(line)
                skip = {"timestamp", "level", "message", "target", "span", "spans"}
                fields = " ".join(f"{k}={v}" for k, v in rec.items() if k not in skip)
                line = (f"{rec.get('timestamp', '')[11:23]} {rec.get('level', '')} "
                        f"{rec.get('message', '')} {fields}")
            except (ValueError, AttributeError):
                pass
            out.append("  " + line[:300])
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# A protocol client (the Python side of the conversations)


class WsClient:
    """A WebSocket client whose reader thread files every frame; replies are matched by ref."""

    def __init__(self, http: str, user: str) -> None:
        self.user = user
        self.ws = ws_connect(f"ws://{http}/ws?user={user}", open_timeout=REQUEST_TIMEOUT,
                             max_size=None)
        self.frames: list[dict] = []
        self.cond = threading.Condition()
        self.closed = False
        self.next_ref = 1
        threading.Thread(target=self._read, daemon=True).start()
        self.welcome = self.wait_for(lambda f: f.get("type") == "welcome", "welcome")

    def _read(self) -> None:
        try:
            for raw in self.ws:
                f = json.loads(raw)
                with self.cond:
                    self.frames.append(f)
                    self.cond.notify_all()
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def wait_for(self, pred, what: str, timeout: float = REQUEST_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for f in self.frames:
                    if pred(f):
                        return f
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise CheckFailed(f"{self.user}: no {what} within {timeout} s "
                                      f"(closed={self.closed}); last frames {self.frames[-5:]}")
                self.cond.wait(left)

    def request(self, frame: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
        with self.cond:
            ref = f"{self.user}-{self.next_ref}"
            self.next_ref += 1
        self.ws.send(json.dumps({**frame, "ref": ref}))
        return self.wait_for(lambda f: f.get("ref") == ref and f.get("type") != "message",
                             f"reply to {frame}", timeout)

    def until_ok(self, frame: dict, ok_type: str, timeout: float) -> dict:
        """Repeats `frame` while the node answers `unavailable` (a room failing over)."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.request(frame)
            if reply.get("type") == ok_type:
                return reply
            expect(reply.get("type") == "error" and reply.get("code") == "unavailable",
                   f"{self.user}: {frame} got {reply}")
            expect(time.monotonic() < deadline,
                   f"{self.user}: {frame} still unavailable after {timeout} s")
            time.sleep(0.1)  # retry pacing only; the deadline bounds the wait

    def join(self, room: str, timeout: float = REQUEST_TIMEOUT) -> int:
        return self.until_ok({"type": "join", "room": room}, "joined", timeout)["seq"]

    def send(self, room: str, text: str, timeout: float = REQUEST_TIMEOUT) -> int:
        # The text doubles as the client message id: a retry after `unavailable` is stored once.
        reply = self.until_ok({"type": "send", "room": room, "text": text, "id": text}, "ack",
                              timeout)
        return reply["seq"]

    def history(self, room: str, timeout: float = REQUEST_TIMEOUT) -> list[dict]:
        return self.until_ok({"type": "history", "room": room, "limit": 500}, "history",
                             timeout)["messages"]

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - best effort at clean-up
            pass


# ---------------------------------------------------------------------------------------------
# Browsers and the page


def find_exe(*names: str) -> str:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise CheckFailed(f"none of {names} is installed (apt-get install chromium chromium-driver)")


class Page:
    """One headless Chromium with its own profile, driving the chat page."""

    def __init__(self, tag: str, workdir: Path) -> None:
        self.tag = tag
        opts = webdriver.ChromeOptions()
        opts.binary_location = find_exe("chromium", "chromium-browser", "google-chrome")
        opts.add_argument("--headless=new")
        if os.geteuid() == 0:
            opts.add_argument("--no-sandbox")
        opts.add_argument("--disable-dev-shm-usage")
        opts.add_argument("--disable-gpu")
        opts.add_argument("--window-size=1280,800")
        opts.add_argument(f"--user-data-dir={workdir / ('chrome-' + tag)}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.service = Service(executable_path=find_exe("chromedriver"))
        self.driver = webdriver.Chrome(options=opts, service=self.service)
        self.console: list[str] = []
        self.user = tag  # the name it logged in with

    def quit(self) -> None:
        try:
            self.driver.quit()
        except Exception:  # noqa: BLE001 - clean-up must go on
            proc = getattr(self.service, "process", None)
            if proc and proc.poll() is None:
                proc.kill()

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def state(self) -> dict:
        return self.js("return window.chatDebug.state()")

    def status(self) -> str:
        return self.driver.find_element(By.ID, "status").text

    def wait(self, pred, what: str, timeout: float = UI_TIMEOUT):
        """Polls `pred(self)` until truthy; its value. Fails with `what` and the page state."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
                lambda _d: pred(self))
        except TimeoutException:
            raise CheckFailed(f"{self.user}'s page: {what} (not within {timeout} s)") from None

    def login(self, url: str, user: str) -> None:
        self.user = user
        self.driver.get(url)
        field = self.wait(lambda p: p.driver.find_element(By.ID, "user"), "login form shown")
        field.clear()
        field.send_keys(user)
        self.driver.find_element(By.ID, "connect").click()
        self.wait(lambda p: p.status().startswith("connected to"),
                  f"{user} connected (status shows 'connected to …')")

    def join(self, room: str) -> None:
        box = self.driver.find_element(By.ID, "room-input")
        box.clear()
        box.send_keys(room)
        self.driver.find_element(By.ID, "join-button").click()
        self.wait(lambda p: p.js(
            "const li = document.querySelector(`#rooms li[data-room='${arguments[0]}']`);"
            "return !!li && !li.classList.contains('not-joined');", room),
            f"room {room} in the sidebar and joined")
        self.wait(lambda p: p.driver.find_element(By.ID, "view-title").text == f"#{room}",
                  f"room {room} shown")

    def type_message(self, text: str) -> None:
        """Types `text` in the send box (a newline as Shift+Enter) and presses Enter."""
        box = self.driver.find_element(By.ID, "message-input")
        for i, line in enumerate(text.split("\n")):
            if i:
                ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER) \
                    .key_up(Keys.SHIFT).perform()
            box.send_keys(line)
        box.send_keys(Keys.ENTER)

    def dom_messages(self) -> list[dict]:
        """The room messages on screen, in DOM order."""
        return self.js("""
            return [...document.querySelectorAll('#messages .msg[data-seq]')].map((e) => ({
              seq: Number(e.dataset.seq),
              from: (e.querySelector('.from') || {}).textContent,
              text: (e.querySelector('.text') || {}).textContent,
              mine: e.classList.contains('mine'),
              pending: e.classList.contains('pending') || e.classList.contains('outbox'),
            }));""")

    def texts(self, selector: str) -> list[str]:
        """The textContent of every element matching `selector`."""
        return self.js("return [...document.querySelectorAll(arguments[0])]"
                       ".map((e) => e.textContent)", selector)

    def dom_pending(self) -> list[str]:
        """Texts of the outbox entries (sent, not yet acknowledged) on screen."""
        return self.js("return [...document.querySelectorAll('#messages .msg.outbox')]"
                       ".map((e) => e.textContent)")

    def collect_console(self) -> None:
        try:
            for e in self.driver.get_log("browser"):
                self.console.append(f"{e.get('level')} {e.get('message')}")
        except WebDriverException:
            pass

    def diagnostics(self) -> str:
        out = [f"--- browser {self.tag} (user {self.user})"]
        try:
            out.append(f"url: {self.driver.current_url}")
            out.append(f"status: {self.status()!r}")
            st = self.state()
            for name, r in st.get("rooms", {}).items():
                seqs = [m["seq"] for m in r["messages"]]
                r = {**r, "messages": f"{len(seqs)} messages, seqs {compact(seqs)}"}
                st["rooms"][name] = r
            out.append("chatDebug.state(): " + json.dumps(st)[:3000])
            out.append(f"DOM seqs: {compact([m['seq'] for m in self.dom_messages()])}")
        except Exception as e:  # noqa: BLE001 - diagnostics must not mask the failure
            out.append(f"(page state unavailable: {e})")
        self.collect_console()
        out.append("console:")
        out += [f"  {line}" for line in self.console[-30:]]
        return "\n".join(out)


def compact(seqs: list[int]) -> str:
    """`1-50,52,52,53` style, keeping order and duplicates visible."""
    parts: list[str] = []
    i = 0
    while i < len(seqs):
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        parts.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return ",".join(parts) or "none"


# ---------------------------------------------------------------------------------------------
# The checks


def check_single_node(node: Node, alice: Page, bob: Page) -> None:
    url = f"http://{node.http}/"
    log(f"part 1: one node at {node.http}, two browsers")

    alice.login(url, "alice")
    bob.login(url, "bob")
    expect(alice.status() == f"connected to {node.name} as alice",
           f"alice's status {alice.status()!r}")
    passed(f"both pages log in: status {alice.status()!r} / {bob.status()!r}")

    alice.join("lobby")
    bob.join("lobby")
    passed("both join #lobby through the join form")

    bob.wait(lambda p: p.driver.find_elements(By.CSS_SELECTOR, "#members li[data-user='alice']"),
             "alice in bob's member list")
    alice.wait(lambda p: p.driver.find_elements(By.CSS_SELECTOR, "#members li[data-user='bob']"),
               "bob in alice's member list (presence join)")
    alice.wait(lambda p: any(t.endswith("bob joined") for t in p.texts("#messages .sys.presence")),
               "'bob joined' presence line in alice's room view")
    passed("presence: bob's member list shows alice, alice's shows bob and 'bob joined'")

    text = f"hello from alice {random.randrange(10**6)}"
    alice.type_message(text)
    got = bob.wait(lambda p: [m for m in p.dom_messages() if m["text"] == text],
                   f"alice's message {text!r} in bob's DOM")
    expect(len(got) == 1 and got[0]["from"] == "alice" and not got[0]["mine"],
           f"bob's DOM entries for the message: {got}")
    seq = got[0]["seq"]
    passed(f"alice types + Enter: bob's page shows '.msg[data-seq={seq}]' {text!r} from alice")

    alice.wait(lambda p: not p.dom_pending() and any(m["text"] == text for m in p.dom_messages()),
               "alice's own message shown acknowledged (no pending outbox entry)")
    mine = [m for m in alice.dom_messages() if m["text"] == text]
    expect(len(mine) == 1 and mine[0]["seq"] == seq and mine[0]["mine"] and not mine[0]["pending"],
           f"alice's DOM entries for her message: {mine}")
    lobby = alice.state()["rooms"]["lobby"]
    expect(lobby["pending"] == [], f"alice's outbox not empty: {lobby['pending']}")
    passed(f"alice's message is acked: shown at seq {seq} as hers, outbox empty")

    # Network text must reach the page as text only, line breaks kept.
    reply = (f"hi alice, bob here {random.randrange(10**6)} <b>not bold</b>\n"
             "<img src=x onerror=\"window.__xss=1\"> second line")
    bob.type_message(reply)
    alice.wait(lambda p: [m for m in p.dom_messages() if m["text"] == reply and m["from"] == "bob"],
               f"bob's two-line reply {reply!r} in alice's DOM, as typed")
    injected = alice.js("return [document.querySelectorAll('#messages b, #messages img').length,"
                        " window.__xss === undefined]")
    expect(injected == [0, True], f"markup from a message became elements in alice's page: "
           f"[elements, no script ran] = {injected}")
    passed("bob's two-line reply (Shift+Enter) with HTML in it reaches alice's page as plain text")

    # History: 120 messages written before the page joins; the page loads the newest page
    # first and must fetch the older ones when the list is scrolled to the top.
    room = f"archive-{random.randrange(10**6)}"
    loader = WsClient(node.http, "loader")
    try:
        loader.join(room)
        for i in range(1, 121):
            loader.send(room, f"old message {i:03d}")
    finally:
        loader.close()
    passed(f"pre-loaded 120 messages into #{room} with a WebSocket client")

    alice.join(room)
    alice.wait(lambda p: any(m["seq"] == 120 for m in p.dom_messages()),
               "newest archived message (seq 120) on screen")
    first = alice.dom_messages()
    min_seq = min(m["seq"] for m in first)
    scrollable = alice.js("const b = document.getElementById('messages');"
                          "return [b.scrollHeight, b.clientHeight];")
    expect(min_seq > 1 and scrollable[0] > scrollable[1],
           f"after joining, the page already shows seq {min_seq} (scrollHeight/clientHeight "
           f"{scrollable}): the scroll-up path is not exercised")
    passed(f"joining #{room} shows seqs {compact([m['seq'] for m in first])} (a scrollable list)")

    box = alice.driver.find_element(By.ID, "messages")
    deadline = time.monotonic() + 20
    rounds = 0
    while not any(m["seq"] == 1 for m in alice.dom_messages()):
        expect(time.monotonic() < deadline,
               f"seq 1 not loaded after {rounds} scrolls to the top; DOM seqs "
               f"{compact([m['seq'] for m in alice.dom_messages()])}")
        before = min(m["seq"] for m in alice.dom_messages())
        # A real wheel gesture over the list, as a user scrolling up.
        ActionChains(alice.driver).scroll_from_origin(ScrollOrigin.from_element(box), 0, -20000) \
            .perform()
        rounds += 1
        try:
            alice.wait(lambda p: min(m["seq"] for m in p.dom_messages()) < before,
                       "older messages loaded", timeout=3)
        except CheckFailed:
            pass  # scroll again until the overall deadline
    dom = alice.dom_messages()
    seqs = [m["seq"] for m in dom]
    expect(seqs == list(range(1, 121)), f"#{room} DOM seqs after scrolling up: {compact(seqs)}")
    wrong = [m for m in dom if (m["text"], m["from"]) != (f"old message {m['seq']:03d}", "loader")]
    expect(not wrong, f"#{room} messages whose text or sender does not match their seq: "
           f"{wrong[:3]}")
    passed(f"scrolling to the top loads older history: seqs 1-120 exactly once, in order "
           f"({rounds} wheel scrolls)")

    # Direct message from the UI: click bob's name in the member list, type, Enter.
    alice.driver.find_element(By.CSS_SELECTOR,
                              "#rooms li[data-room='lobby'] button.room-name").click()
    alice.wait(lambda p: p.driver.find_element(By.ID, "view-title").text == "#lobby", "lobby shown")
    alice.wait(lambda p: p.driver.find_elements(
        By.CSS_SELECTOR, "#members li[data-user='bob'] button"), "bob in alice's member list")
    alice.driver.find_element(By.CSS_SELECTOR, "#members li[data-user='bob'] button").click()
    alice.wait(lambda p: p.driver.find_element(By.ID, "message-input").get_attribute("value")
               == "/msg bob ", "clicking bob's name prefills '/msg bob '")
    secret = f"psst bob {random.randrange(10**6)}"
    alice.type_message(secret)
    alice.wait(lambda p: any(secret in t for t in p.texts("#messages .msg.direct.mine"))
               and not p.state()["pendingDirect"],
               "alice's direct shown as sent (acked) in her Direct view")
    bob.wait(lambda p: p.js("const u = document.querySelector('#direct-entry .unread');"
                            "return !!u && u.textContent === '1';"),
             "an unread mark on bob's Direct entry")
    bob.driver.find_element(By.CSS_SELECTOR, "#direct-entry li button.room-name").click()
    shown = bob.wait(lambda p: [t for t in p.texts("#messages .msg.direct") if secret in t],
                     f"the direct {secret!r} in bob's Direct view")
    expect(len(shown) == 1 and "alice" in shown[0], f"bob's direct entries: {shown}")
    passed(f"direct via the UI: alice clicks bob, types {secret!r}; bob's page shows it once")


def pick_room_owned_by(node: Node) -> tuple[str, dict]:
    """A room whose owner is `node`, so that killing it moves the room too."""
    tag = random.randrange(10**6)
    for k in range(200):
        room = f"failover-{tag}-{k}"
        status, body = http_get(f"http://{node.http}/cluster/rooms/{room}")
        expect(status == 200, f"/cluster/rooms/{room} on {node.name}: {status} {body}")
        placement = json.loads(body)
        if placement["owner"] == node.name:
            return room, placement
    raise CheckFailed(f"no room owned by {node.name} among 200 names")


def members_shown(p: Page) -> list[str]:
    return p.js("return [...document.querySelectorAll('#members li[data-user]')]"
                ".map((e) => e.dataset.user)")


def check_failover(nodes: list[Node], carol: Page, erin: Page) -> None:
    n1, n2, n3 = nodes
    log(f"part 2: failover, cluster {', '.join(f'{n.name}={n.http}' for n in nodes)}")
    deadline = time.monotonic() + FORM_TIMEOUT
    for n in nodes:
        n.wait_healthy(deadline, members=len(nodes))
    passed("3-node cluster formed: every /healthz is 200 with 3 members")

    room, placement = pick_room_owned_by(n1)
    log(f"     room {room}: owner {placement['owner']}, replicas {placement['replicas']}")

    dave = WsClient(n2.http, "dave")
    try:
        expect(dave.welcome.get("node") == n2.name, f"dave's welcome: {dave.welcome}")
        dave.join(room)

        carol.login(f"http://{n1.http}/?nodes={n1.http},{n2.http}", "carol")
        expect(carol.status() == f"connected to {n1.name} as carol", f"status {carol.status()!r}")
        expect(carol.state()["nodes"] == [n1.http, n2.http], f"nodes: {carol.state()['nodes']}")
        carol.join(room)
        passed(f"carol's page from n1 (?nodes=n1,n2) joins #{room} (owned by n1); dave on n2")

        # A second page without ?nodes: it must learn the other nodes from /cluster (public_url).
        erin.login(f"http://{n1.http}/", "erin")
        expect(erin.status() == f"connected to {n1.name} as erin", f"status {erin.status()!r}")
        erin.wait(lambda p: p.state()["nodes"] == [n.http for n in nodes],
                  f"erin's node list learnt from /cluster is {[n.http for n in nodes]}")
        erin.join(room)
        passed("erin's page from n1 (no ?nodes) learns n2, n3 from /cluster and joins too")

        dave_texts = [f"dave before {i}" for i in range(1, 4)]
        for t in dave_texts:
            dave.send(room, t)
        carol_texts = ["carol before the crash"]
        carol.type_message(carol_texts[0])
        dave.wait_for(lambda f: f.get("type") == "message" and f.get("text") == carol_texts[0],
                      "carol's message as an event")
        for p in (carol, erin):
            p.wait(lambda p: [m["text"] for m in p.dom_messages()] == dave_texts + carol_texts
                   and not p.dom_pending(), "the 4 messages shown, carol's acked")
            p.wait(lambda p: members_shown(p) == ["carol", "dave", "erin"],
                   "member list carol, dave, erin")
        passed("messages flow both ways between the pages (n1) and dave (n2); members listed")

        n1.kill()
        log("     n1 SIGKILLed; dave keeps sending from n2, carol types at once")
        # Typed while the page is losing its node: it must be delivered exactly once, whether
        # it left on the dying socket or waited in the outbox for the next node.
        carol_texts.append("carol during the failover")
        carol.type_message(carol_texts[-1])
        # Two batches from dave: one at once (while the pages are cut off, so it must come back
        # by the resumed join), one after they are back (live, from the room's new owner).
        during = [f"dave during failover {i}" for i in range(1, 4)]
        after_reconnect = [f"dave after reconnect {i}" for i in range(1, 3)]
        errors: list[str] = []
        acked_at: list[float] = []

        def keep_sending() -> None:
            try:
                for t in during:
                    dave.send(room, t, timeout=FAILOVER_TIMEOUT)
                    acked_at.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(f"{type(e).__name__}: {e}")

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()

        carol.wait(lambda p: p.status() == f"connected to {n2.name} as carol"
                   and p.state()["node"] == n2.name,
                   "carol's page reconnected to n2 by itself", timeout=FAILOVER_TIMEOUT)
        back_at = time.monotonic()
        passed(f"carol's page reconnects to n2 on its own: status {carol.status()!r}")
        erin.wait(lambda p: p.state()["connected"] and p.state()["node"] in (n2.name, n3.name)
                  and p.status() == f"connected to {p.state()['node']} as erin",
                  "erin's page reconnected to n2 or n3 by itself", timeout=FAILOVER_TIMEOUT)
        passed(f"erin's page reconnects on its own: status {erin.status()!r}")

        sender.join(FAILOVER_TIMEOUT + REQUEST_TIMEOUT)
        expect(not sender.is_alive() and not errors, f"dave's sends during failover: {errors}")
        early = sum(1 for t in acked_at if t < back_at)
        passed(f"dave's {len(during)} sends right after the kill are acked "
               f"({early} of them before carol's page was seen back on n2)")
        for t in after_reconnect:
            dave.send(room, t, timeout=FAILOVER_TIMEOUT)
        passed(f"dave's {len(after_reconnect)} sends after the pages are back are acked")
        dave_texts += during + after_reconnect

        # The cluster's history is the reference: one total order, each message once.
        def history_complete() -> list[dict]:
            h = dave.history(room, timeout=FAILOVER_TIMEOUT)
            return h if len(h) >= len(dave_texts) + len(carol_texts) else []

        history: list[dict] = []
        hist_deadline = time.monotonic() + FAILOVER_TIMEOUT
        while not history and time.monotonic() < hist_deadline:
            history = history_complete()
            if not history:
                time.sleep(0.1)  # poll pacing; bounded by hist_deadline
        expect(bool(history), f"carol's message typed during the failover never stored: "
               f"history {[m['text'] for m in dave.history(room)]}; page pending "
               f"{carol.state()['rooms'].get(room, {}).get('pending')}")
        hseqs = [m["seq"] for m in history]
        htexts = [m["text"] for m in history]
        expect(hseqs == list(range(1, len(history) + 1)), f"history seqs {compact(hseqs)}")
        expect(sorted(htexts) == sorted(dave_texts + carol_texts),
               f"history of {room} after failover (each message once expected): {htexts}")
        expect([t for t in htexts if t.startswith("dave")] == dave_texts
               and [t for t in htexts if t.startswith("carol")] == carol_texts,
               f"history of {room}: a sender's messages out of order: {htexts}")
        passed(f"the cluster's history holds all {len(history)} messages once, "
               f"seqs 1-{len(history)}")

        expected = list(zip(hseqs, htexts))

        def page_matches(p: Page) -> bool:
            st = p.state()["rooms"].get(room, {})
            return ([(m["seq"], m["text"]) for m in p.dom_messages()] == expected
                    and [(m["seq"], m["text"]) for m in st.get("messages", [])] == expected
                    and not p.dom_pending() and not st.get("pending") and st.get("joined"))

        for p in (carol, erin):
            try:
                p.wait(page_matches, "", timeout=FAILOVER_TIMEOUT)
            except CheckFailed:
                dom = p.dom_messages()
                raise CheckFailed(
                    f"{p.user}: after failover the page shows seqs "
                    f"{compact([m['seq'] for m in dom])} texts {[m['text'] for m in dom]}; "
                    f"expected seqs 1-{len(history)} texts {htexts}; "
                    f"pending on screen {p.dom_pending()}") from None
            passed(f"{p.user}'s page shows every message exactly once in seq order "
                   f"(seqs 1-{len(history)}, the cluster's texts), nothing pending")

        for p in (carol, erin):
            p.wait(lambda p: members_shown(p) == ["carol", "dave", "erin"],
                   f"member list carol, dave, erin after failover (shows {members_shown(p)})")
        passed("member lists after failover: carol, dave, erin")

        after = "carol after the failover"
        carol.type_message(after)
        carol.wait(lambda p: [m for m in p.dom_messages() if m["text"] == after and m["mine"]]
                   and not p.dom_pending(), "carol's post-failover message acked in the page",
                   timeout=FAILOVER_TIMEOUT)
        got = dave.wait_for(lambda f: f.get("type") == "message" and f.get("text") == after,
                            "carol's post-failover message as an event", timeout=UI_TIMEOUT)
        expect(got["seq"] == len(history) + 1 and got["from"] == "carol", f"event: {got}")
        for p in (carol, erin):
            p.wait(lambda p: [m["seq"] for m in p.dom_messages()]
                   == list(range(1, len(history) + 2)),
                   f"seqs 1-{len(history) + 1} on screen at the end")
        passed(f"a message typed after failover is acked (seq {got['seq']}), reaches dave on n2 "
               "and erin's page")
    finally:
        dave.close()


def warn_if_stale() -> None:
    built = BINARY.stat().st_mtime
    newer = [p for d in ("node/src", "protocol/src") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.stat().st_mtime > built]
    if newer:
        log(f"warning: {len(newer)} source files are newer than {BINARY} "
            f"(e.g. {newer[0].relative_to(ROOT)}); run: cargo build --release -p chat-node")


def say(text: str) -> None:
    """Prints, never raising: clean-up must go on even when stdout is gone (a closed pipe)."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def main() -> int:
    if not BINARY.is_file():
        say(f"FAIL: {BINARY} not found; build it with: cargo build --release -p chat-node "
            "(or set CHAT_NODE_BIN)")
        return 1
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the `finally` below kills the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    warn_if_stale()
    workdir = Path(tempfile.mkdtemp(prefix="chat-browser-test-"))
    nodes: list[Node] = []
    pages: list[Page] = []
    ok = False
    failure = ""
    try:
        single = Node("solo", "127.0.0.1", workdir, cluster=False)
        # The cluster nodes each on their own loopback address, as on separate hosts.
        # 127.0.1.x: the Rust suites use 127.0.0.x ranges, and both may run at once.
        base = random.randrange(1, 250)
        cluster = [Node(f"n{i}", f"127.0.1.{base + i}", workdir, cluster=True) for i in (1, 2, 3)]
        nodes = [single, *cluster]
        seeds = ",".join(n.cluster_addr for n in cluster)
        single.start([])
        # The cluster forms while part 1 runs.
        for n in cluster:
            n.start(["--cluster-listen", n.cluster_addr, "--seeds", seeds, "--cookie", COOKIE,
                     "--public-url", f"http://{n.http}"])
        single.wait_healthy(time.monotonic() + START_TIMEOUT)
        passed(f"node {single.name} healthy at {single.http}")

        starters = [threading.Thread(target=lambda t=t: pages.append(Page(t, workdir)))
                    for t in ("alice", "bob")]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        expect(len(pages) == 2, "a browser failed to start (see the traceback above)")
        pages.sort(key=lambda p: p.tag)
        alice, bob = pages
        passed("two headless Chromium browsers started")

        check_single_node(single, alice, bob)
        check_failover(cluster, alice, bob)
        ok = True
    except CheckFailed as e:
        failure = f"FAIL: {e}"
    except BaseException:  # noqa: BLE001 - a crash or an interrupt is a failure too
        failure = "FAIL: the test crashed or was interrupted:\n" + traceback.format_exc()
    finally:
        report: list[str] = []
        if not ok:
            report += [p.diagnostics() for p in pages]
        for p in pages:
            p.quit()
        for n in nodes:
            try:
                n.kill()
            except Exception as e:  # noqa: BLE001 - keep killing the others
                report.append(f"could not kill {n.name}: {e}")
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            report += [f"--- log of node {n.name} ({n.log_path}), last lines:\n{n.log_tail()}"
                       for n in nodes]
            report.append(f"(logs and data kept in {workdir})")
    took = time.monotonic() - T0
    if ok:
        say(f"\nPASS: {CHECKS} checks in {took:.1f} s (web client: messaging, presence, "
            "history on scroll-up, direct, failover to another node)")
        return 0
    say(f"\n{failure}")
    for r in report:
        say(r)
    say(f"\n{failure.splitlines()[0]}\nFAILED after {CHECKS} passing checks, {took:.1f} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
