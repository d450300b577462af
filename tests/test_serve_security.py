"""Attacks on `lookalike serve`, each against a real uvicorn server on a loopback port (in-process,
with the settings `lookalike serve` uses: `server_config`): cross-site writes, foreign Host names,
slow request heads, connection floods, overload, timeouts around a commit, name clashes and a
thumbnail rendered across a replace. (Attacks on the CLI server itself are in test_serve.py.)"""
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import read_response as _read_response, served_collection

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

KEY = "k3y"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return served_collection(tmp_path_factory.mktemp("serve_security"), n_classes=3, per_class=2)


def _service(collection: Path, tmp_path: Path, **settings):
    from lookalike.serve import SearchService, ServeConfig

    shutil.copytree(collection / "col", tmp_path / "col", ignore=shutil.ignore_patterns("journal.jsonl", "items"))
    return SearchService(tmp_path / "col", ServeConfig(threads=1, **settings))


@contextlib.contextmanager
def running(service, **overrides):
    """The service behind uvicorn, configured as `lookalike serve` configures it; yields the port."""
    import uvicorn

    from lookalike.serve import create_app, server_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = dict(dict(host="127.0.0.1", port=port, log_level="critical"), **overrides)
    srv = uvicorn.Server(server_config(create_app(service), service.config, **overrides))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.time() + 30
        while not srv.started:
            assert time.time() < deadline and t.is_alive(), "server did not start"
            time.sleep(0.02)
        yield port
    finally:
        srv.should_exit = True
        t.join(10)


def _jpeg(collection: Path, name="new_0_70.jpg") -> bytes:
    return (collection / "extra" / name).read_bytes()


def _error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == status, body
    for n in needles:
        assert n in body["error"]["message"], body
    return body["error"]["message"]


def _request_bytes(method: str, url: str, **kw) -> bytes:
    """An HTTP/1.1 request as httpx would send it (Connection: close), byte for byte."""
    req = httpx.Request(method, url, **kw)
    body = req.read()
    head = [f"{method} {req.url.raw_path.decode()} HTTP/1.1"]
    headers = {k.lower(): v for k, v in req.headers.items()}
    headers.setdefault("host", req.url.netloc.decode())
    headers["connection"] = "close"
    if body:
        headers["content-length"] = str(len(body))
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _raw(port: int, request: bytes):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        return _read_response(s)


def _closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> tuple[float, bytes]:
    """Keep sending ``dribble`` every 0.2 s (a slow client) until the server closes the connection;
    returns (seconds it took, what the server sent). Fails if it is still open after ``seconds``."""
    t0 = time.monotonic()
    got = b""
    sock.settimeout(0.2)
    while time.monotonic() - t0 < seconds:
        try:
            if dribble:
                sock.sendall(dribble)
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    raise AssertionError(f"connection still open after {seconds} s (received {got[:200]!r})")


# ------------------------------------------------------------------ 1. who may write, from where

def test_writes_need_a_key_or_explicit_permission(collection, tmp_path):
    """Without an API key (the default), writes are refused in the JSON shape, and say how to allow
    them; reads still work. (Old code: any page could POST a form to /items and add an item.)"""
    service = _service(collection, tmp_path)
    with running(service) as port:
        url = f"http://127.0.0.1:{port}"
        files = {"file": ("evil.jpg", _jpeg(collection), "image/jpeg")}
        msg = _error(httpx.post(url + "/items", files=files, data={"name": "evil.jpg"}), 403)
        assert "--api-key" in msg and "--allow-anonymous-writes" in msg
        _error(httpx.delete(url + "/items/g_0_0.jpg"), 403, "--api-key")
        _error(httpx.post(url + "/items", files=files, headers={"X-API-Key": "anything"}), 403)
        assert httpx.post(url + "/search", files=files, data={"k": "2"}).status_code == 200
        assert httpx.get(url + "/health").json()["items"] == 6
    assert "evil.jpg" not in service.col.row_of and not (tmp_path / "col" / "items").exists()


def test_anonymous_writes_when_allowed_but_never_cross_site(collection, tmp_path):
    """allow_anonymous_writes opens writes to clients, not to other sites' pages: a browser's
    cross-site form post carries their Origin and is refused."""
    service = _service(collection, tmp_path, allow_anonymous_writes=True)
    with running(service) as port:
        url = f"http://127.0.0.1:{port}"
        files = {"file": ("x.jpg", _jpeg(collection), "image/jpeg")}
        for origin in ["http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                       f"http://localhost:{port}", "not a url"]:
            _error(httpx.post(url + "/items", files=files, data={"name": "csrf.jpg"}, headers={"Origin": origin}),
                   403, "cross-site")
            _error(httpx.delete(url + "/items/g_0_0.jpg", headers={"Origin": origin}), 403, "cross-site")
        assert "csrf.jpg" not in service.col.row_of and "g_0_0.jpg" in service.col.row_of
        # the server's own page (same origin) and clients without Origin may write
        r = httpx.post(url + "/items", files=files, data={"name": "same.jpg"}, headers={"Origin": url})
        assert r.status_code == 201, r.text
        r = httpx.post(url + "/items", files=files, data={"name": "api.jpg"})
        assert r.status_code == 201, r.text
        assert httpx.delete(url + "/items/api.jpg", headers={"Origin": url}).status_code == 200
        # a cross-site search is not a write
        assert httpx.post(url + "/search", files=files, data={"k": "1"}, headers={"Origin": "http://evil.example"}).status_code == 200


def test_host_names_and_a_reverse_proxy(collection, tmp_path):
    """Only this server's names are answered (DNS rebinding: evil.example resolving to 127.0.0.1);
    a proxy's public name is added with allowed_hosts, and its https Origin then matches."""
    service = _service(collection, tmp_path, api_key=KEY, allowed_hosts=("Search.Example.org",), host="0.0.0.0")
    with running(service, host="127.0.0.1") as port:  # configured as a 0.0.0.0 bind, listening on loopback only
        url = f"http://127.0.0.1:{port}"
        for host in ["evil.example", f"evil.example:{port}", "0.0.0.0", "127.0.0.1.evil.example", "localhost:x",
                     "[::1", "search.example.org.evil.example"]:
            status, headers, body = _raw(port, _request_bytes("GET", url + "/health", headers={"Host": host}))
            assert status == 400, (host, status, body)
            assert headers["content-type"].startswith("application/json")
            err = json.loads(body)["error"]
            assert err["status"] == 400 and ("not served here" in err["message"] or "malformed" in err["message"])
        for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "search.example.org",
                     "search.example.org.:443"]:
            status, _, body = _raw(port, _request_bytes("GET", url + "/health", headers={"Host": host}))
            assert status == 200, (host, status, body)
        status, headers, body = _raw(port, b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's own 400, in the same shape
        assert status == 400 and json.loads(body)["error"]["status"] == 400, body
        # behind a TLS proxy on this machine (Host and X-Forwarded-Proto passed on): its page may write
        proxy = {"Host": "search.example.org", "X-Forwarded-Proto": "https", "X-API-Key": KEY}
        r = httpx.delete(url + "/items/nope.jpg", headers={**proxy, "Origin": "https://search.example.org"})
        _error(r, 404, "no item")  # past every check
        _error(httpx.delete(url + "/items/nope.jpg", headers={**proxy, "Origin": "http://search.example.org"}), 403)
        _error(httpx.delete(url + "/items/nope.jpg", headers={**proxy, "Origin": "https://evil.example"}), 403)


def test_host_rules_on_a_0_0_0_0_bind():
    """Bound to every interface: the defaults, allowed_hosts, and the IP address the connection
    reached (an IP literal cannot be rebound to another site) -- not other names or addresses."""
    from lookalike.serve import ServeConfig
    from lookalike.serve.app import _Guard

    guard = _Guard(None, ServeConfig(host="0.0.0.0", allowed_hosts=("photos.lan",)), None)
    scope = {"server": ("10.1.2.3", 8000)}
    for host, ok in [("10.1.2.3:8000", True), ("10.1.2.3", True), ("photos.lan:8000", True), ("localhost:8000", True),
                     ("[::1]:8000", True), ("10.1.2.4:8000", False), ("0.0.0.0:8000", False), ("evil.example", False)]:
        assert isinstance(guard.host_of(scope, {b"host": host.encode()}), tuple) == ok, host
    assert isinstance(guard.host_of({"server": ("::ffff:10.1.2.3", 8000)}, {b"host": b"10.1.2.3:8000"}), tuple)
    anything = _Guard(None, ServeConfig(allowed_hosts=("*",)), None)
    assert isinstance(anything.host_of(scope, {b"host": b"evil.example"}), tuple)


# ------------------------------------------------------------------ 2. slow clients, many clients

def test_slow_request_heads_are_cut_off(collection, tmp_path):
    """A request head must arrive within header_timeout: a client dribbling header lines, one that
    connects and sends nothing, and one that dribbles its next request on a kept-alive connection are
    all closed in time (the partial ones with a JSON 408). (Old code: open for as long as the client
    likes; a client that never sends is never closed.)"""
    service = _service(collection, tmp_path, header_timeout=1.0, timeout=2.0)
    with running(service) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            took, got = _closed_within(s, 4, dribble=b"X-Slow: 1\r\n")
            assert took < 2.5, took
            assert got.startswith(b"HTTP/1.1 408") and json.loads(got.partition(b"\r\n\r\n")[2])["error"]["status"] == 408, got
        with socket.create_connection(("127.0.0.1", port)) as s:
            took, got = _closed_within(s, 4)
            assert took < 2.5 and got == b"", (took, got)
        with socket.create_connection(("127.0.0.1", port)) as s:  # keep-alive: a response, then a slow head
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /health HTTP/1.1\r\n")
            took, got = _closed_within(s, 4, dribble=b"X-Slow: 1\r\n")
            assert took < 2.5, took
        with socket.create_connection(("127.0.0.1", port)) as s:  # a slow body: 504 at `timeout`, then closed
            s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            took, got = _closed_within(s, 6, dribble=b"x")
            assert b"HTTP/1.1 504" in got and took < 4.5, (took, got[:300])
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200


def test_idle_connections_make_room(collection, tmp_path):
    """More sockets than max_connections, all stuck in their request heads: the oldest are closed
    and a new client is served. (Old code: the server kept them all; with uvicorn's
    limit_concurrency every new request got a plain-text 503.)"""
    service = _service(collection, tmp_path, max_connections=8)
    with running(service) as port:
        stuck = []
        try:
            for _ in range(30):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                stuck.append(s)
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
            assert r.status_code == 200 and r.json()["items"] == 6
            deadline = time.monotonic() + 5  # evictions are the event loop's: poll, a loaded machine is slow
            while True:
                time.sleep(0.1)
                closed = []
                for s in stuck:
                    s.settimeout(0.01)
                    try:
                        s.recv(65536)  # b"" or a 408: closed
                        closed.append(True)
                    except socket.timeout:
                        closed.append(False)
                    except ConnectionResetError:
                        closed.append(True)
                if sum(closed) >= 20 or time.monotonic() > deadline:
                    break
            assert sum(closed) >= 20 and not any(closed[-3:]), closed  # the oldest went first
        finally:
            for s in stuck:
                s.close()


def test_overload_gets_a_json_503_not_a_reset(collection, tmp_path):
    """More concurrent searches than max_in_flight: the rest get 503 in the JSON shape with
    Retry-After, every client reads a response (no connection reset), and the server recovers."""
    service = _service(collection, tmp_path, max_in_flight=3)
    real = service.search

    def slow_search(img, k):
        time.sleep(0.5)
        return real(img, k)

    service.search = slow_search
    with running(service) as port:
        url = f"http://127.0.0.1:{port}"
        request = _request_bytes("POST", url + "/search", files={"file": ("q.jpg", _jpeg(collection), "image/jpeg")},
                                 data={"k": "2"})
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(12)]
        try:
            for s in socks:
                s.sendall(request)
            answers = [_read_response(s) for s in socks]  # a reset would raise here
        finally:
            for s in socks:
                s.close()
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 3 and statuses.count(503) >= 1, statuses
        for status, headers, body in answers:
            assert headers["content-type"].startswith("application/json"), headers
            if status == 503:
                assert headers.get("retry-after") == "1"
                assert json.loads(body)["error"]["status"] == 503 and "busy" in json.loads(body)["error"]["message"]
        assert httpx.post(url + "/search", files={"file": ("q.jpg", _jpeg(collection))}, data={"k": "2"}).status_code == 200


# ------------------------------------------------------------------ 3.-5. writes: clashes, timeouts, thumbnails

def test_item_name_clashing_with_a_file_or_folder_is_409(collection, tmp_path):
    """A name that is a file and a folder at once (x.JPG, then x.JPG/y.jpg; a.jpg/b.jpg, then a.jpg)
    is a 409 in the JSON shape, not a 500, and nothing is added."""
    service = _service(collection, tmp_path, api_key=KEY)
    with running(service) as port:
        url = f"http://127.0.0.1:{port}"

        def add(name):
            return httpx.post(url + "/items", files={"file": ("u.jpg", _jpeg(collection), "image/jpeg")},
                              data={"name": name}, headers={"X-API-Key": KEY})

        assert add("x.JPG").status_code == 201
        _error(add("x.JPG/y.jpg"), 409, "clashes")
        _error(add("x.JPG/deeper/y.jpg"), 409, "clashes")
        assert add("a.jpg/b.jpg").status_code == 201
        _error(add("a.jpg"), 409, "clashes")
        assert httpx.delete(url + "/items/x.JPG", headers={"X-API-Key": KEY}).status_code == 200
        _error(add("x.JPG/y.jpg"), 409)  # the removed item's file is still there
        assert httpx.get(url + "/health").json()["items"] == 7
        assert service.counters["errors"] == 0


def _slowed(service):
    """Make the service's embedding and commit (Collection.add/remove) slow on demand."""
    real_embed, real_add, real_remove = service.embed, service.col.add, service.col.remove
    slow = {"embed": 0.0, "commit": 0.0}

    def embed(img):
        time.sleep(slow["embed"])
        return real_embed(img)

    def add(*a, **kw):
        time.sleep(slow["commit"])
        return real_add(*a, **kw)

    def remove(*a, **kw):
        time.sleep(slow["commit"])
        return real_remove(*a, **kw)

    service.embed, service.col.add, service.col.remove = embed, add, remove
    return slow


def _post_item(collection, port, name):
    return httpx.post(f"http://127.0.0.1:{port}/items", files={"file": ("u.jpg", _jpeg(collection), "image/jpeg")},
                      data={"name": name}, headers={"X-API-Key": KEY}, timeout=30)


def test_a_write_timed_out_before_its_commit_is_never_made(collection, tmp_path):
    """timeout=1 s and an embedding of 2.5 s: 504, and the item does not appear afterwards (the
    retry succeeds instead of a 409). (Old code: 504, then the item was committed anyway.)"""
    service = _service(collection, tmp_path, api_key=KEY, timeout=1.0)
    slow = _slowed(service)
    with running(service) as port:
        slow["embed"] = 2.5
        t0 = time.monotonic()
        msg = _error(_post_item(collection, port, "late.jpg"), 504)
        assert time.monotonic() - t0 < 2.3  # answered at the timeout, not when the embedding ends
        time.sleep(2.0)  # the embedding thread has finished by now: it must not have committed
        assert "late.jpg" not in service.col.row_of and service.counters["adds"] == 0
        journal = tmp_path / "col" / "journal.jsonl"
        assert not journal.exists() or b"late.jpg" not in journal.read_bytes()
        slow["embed"] = 0.0
        r = _post_item(collection, port, "late.jpg")
        assert r.status_code == 201, r.text  # the retry is not a 409
        assert "nothing was changed" in msg


def test_a_write_that_began_its_commit_is_finished_and_answered(collection, tmp_path):
    """timeout=0.5 s and a commit of 1.5 s: the write is waited for and answered 201 (a delete 200),
    not 504. (Old code: 504 for a write that was made.)"""
    service = _service(collection, tmp_path, api_key=KEY, timeout=0.5)
    slow = _slowed(service)
    with running(service) as port:
        slow["commit"] = 1.5
        t0 = time.monotonic()
        r = _post_item(collection, port, "slow-commit.jpg")
        assert r.status_code == 201, r.text
        assert time.monotonic() - t0 >= 1.4 and "slow-commit.jpg" in service.col.row_of
        r = httpx.delete(f"http://127.0.0.1:{port}/items/slow-commit.jpg", headers={"X-API-Key": KEY}, timeout=30)
        assert r.status_code == 200 and r.json()["deleted"] == "slow-commit.jpg", r.text
        slow["commit"] = 0.0
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["items"] == 6
        # a search running past the timeout is still a 504
        service.search = lambda img, k: time.sleep(2.0)
        _error(httpx.post(f"http://127.0.0.1:{port}/search", files={"file": ("q.jpg", _jpeg(collection))}), 504, "longer than")


def test_thumbnail_rendered_across_a_replace_is_not_cached(collection, tmp_path):
    """DELETE + POST of a name while its old image is being rendered: the old thumbnail must not
    be cached for the new image."""
    from PIL import Image

    from lookalike.data import load_image

    service = _service(collection, tmp_path)
    name = "g_0_0.jpg"
    new = _jpeg(collection, "new_1_70.jpg")
    real_path = service.image_path
    raced = []

    def image_path(n):
        path = real_path(n)
        if not raced:  # between finding the old file and caching its thumbnail, the name is replaced
            raced.append(n)
            service.delete(n)
            service.add(n, new, load_image(tmp_path / "new.jpg"))
        return path

    (tmp_path / "new.jpg").write_bytes(new)
    service.image_path = image_path
    service.thumbnail(name)  # renders the old image (already replaced)
    service.image_path = real_path
    fresh = service.thumbnail(name)
    got = np.asarray(Image.open(io.BytesIO(fresh)).convert("RGB"), np.float32)
    want = np.asarray(load_image(tmp_path / "new.jpg").convert("RGB").resize(Image.open(io.BytesIO(fresh)).size), np.float32)
    old = np.asarray(load_image(collection / "gallery" / name).convert("RGB").resize(Image.open(io.BytesIO(fresh)).size),
                     np.float32)
    assert np.abs(got - want).mean() < np.abs(got - old).mean() / 2
