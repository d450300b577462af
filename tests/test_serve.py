"""The real server (`lookalike serve` in a subprocess) on a loopback port, every endpoint, and a
headless-Chromium test of the page."""
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import lookalike_cli, read_response as _read_response, served_collection

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

KEY = "s3cret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, collection: Path, *extra, key: str | None = KEY):
        self.collection = collection
        self.extra = (("--api-key", key) if key else ()) + extra
        self.proc = None

    def start(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.collection.parent / f"server-{self.port}.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_API_KEY"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lookalike.cli", "serve", str(self.collection),
                                      "--port", str(self.port), "--max-upload-mb", "0.5",
                                      "--threads", "1", *self.extra], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.collection.parent / f"server-{self.port}.log").read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError("server did not start")

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.log.close()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return served_collection(tmp_path_factory.mktemp("serve"), n_classes=4, per_class=3)


@pytest.fixture(scope="module")
def server(collection):
    srv = Server(collection / "col").start()
    yield srv
    srv.stop()


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


def _error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["status"] == status, body
    assert "Traceback" not in r.text and "File \"" not in r.text
    for n in needles:
        assert n in body["error"]["message"], body
    return body["error"]["message"]


def _search(srv, data: bytes, k=3, name="q.jpg"):
    return httpx.post(srv.url + "/search", files={"file": (name, data, "image/jpeg")}, data={"k": str(k)}, timeout=30)


def test_health_stats_docs_page(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "items": 12}
    st = httpx.get(server.url + "/stats").json()
    assert st["items"] == 12 and st["dim"] > 0 and st["factory"] == "Flat" and st["model"]
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/search", "/items", "/items/{name}", "/images/{name}", "/health", "/stats"} <= set(schema["paths"])
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "cdn" not in docs.text.lower()
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "Drop a photo" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    _error(httpx.get(server.url + "/nope"), 404)
    _error(httpx.put(server.url + "/search"), 405)


def test_search_and_thumbnails(server, collection):
    r = _search(server, _jpeg(collection / "gallery" / "g_2_1.jpg"), k=3)
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 3 and hits[0]["name"] == "g_2_1.jpg" and hits[0]["score"] > 0.99
    assert all(h["name"].startswith("g_2_") for h in hits)  # the easy synthetic classes
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    t = httpx.get(server.url + hits[1]["thumbnail"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(t.content))
    assert im.format == "JPEG" and max(im.size) <= 256


def test_bad_uploads(server, collection):
    _error(_search(server, b"hello, I am not an image", name="fake.jpg"), 415, "not an image")
    _error(_search(server, b""), 400, "empty")
    good = _jpeg(collection / "gallery" / "g_0_0.jpg")
    _error(_search(server, good[: len(good) // 3]), 415, "truncated")
    _error(httpx.post(server.url + "/search", data={"k": "3"}), 422, "file")
    _error(_search(server, good, k=0), 422, "k must be")
    _error(_search(server, good, k=1000), 422, "k must be")
    _error(_search(server, good, k="many"), 422)
    big = os.urandom(700_000)  # over the 0.5 MB limit
    _error(_search(server, big), 413)

    def chunks():  # no Content-Length: the streamed body is counted
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        for _ in range(8):
            yield b"x" * 100_000

    r = httpx.post(server.url + "/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    _error(r, 413)
    # the server is still fine
    assert _search(server, good).status_code == 200


def test_path_traversal(server, collection):
    secret = collection / "secret.jpg"
    shutil.copy(collection / "gallery" / "g_0_0.jpg", secret)
    for raw in ["/images/../secret.jpg", "/images/%2e%2e/secret.jpg", "/images/..%2Fsecret.jpg",
                "/images/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/images//etc/passwd", "/images/g_0_0.jpg/../../secret.jpg",
                "/images/nope.jpg"]:
        status, headers, body = _raw_get(server.port, raw)  # sent byte for byte, no client-side clean-up
        assert status in (400, 404), (raw, status)
        assert headers.get("content-type", "").startswith("application/json"), (raw, headers)
        assert b"\xff\xd8" not in body[:4]  # never a JPEG


def _raw_get(port: int, path: str, host: str = "127.0.0.1"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return _read_response(s)


def test_items_add_delete_persist(server, collection):
    url = server.url
    new = _jpeg(collection / "extra" / "new_1_70.jpg")
    files = {"file": ("upload.jpg", new, "image/jpeg")}
    _error(httpx.post(url + "/items", files=files, data={"name": "added/new1.jpg"}), 401, "X-API-Key")
    _error(httpx.post(url + "/items", files=files, data={"name": "added/new1.jpg"}, headers={"X-API-Key": "wrong"}), 401)
    for bad in ["../evil.jpg", "/abs.jpg", "a/../../b.jpg", ".hidden.jpg", "noext", "a\\b.jpg"]:
        _error(httpx.post(url + "/items", files=files, data={"name": bad}, headers={"X-API-Key": KEY}), 400, "invalid name")
    _error(httpx.post(url + "/items", files={"file": ("x.jpg", b"GIF89a-not-really", "image/gif")},
                      data={"name": "x.jpg"}, headers={"X-API-Key": KEY}), 415)
    r = httpx.post(url + "/items", files=files, data={"name": "added/new1.jpg"}, headers={"X-API-Key": KEY})
    assert r.status_code == 201, r.text
    assert r.json()["count"] == 13
    assert (collection / "col" / "items" / "added" / "new1.jpg").read_bytes() == new
    _error(httpx.post(url + "/items", files=files, data={"name": "added/new1.jpg"}, headers={"X-API-Key": KEY}), 409)
    hits = _search(server, new, k=2).json()["results"]
    assert hits[0]["name"] == "added/new1.jpg" and hits[0]["score"] > 0.99  # searchable at once
    assert httpx.get(url + hits[0]["thumbnail"]).status_code == 200
    # the file name is the default name
    other = _jpeg(collection / "extra" / "new_0_70.jpg")
    r = httpx.post(url + "/items", files={"file": ("new0.jpg", other, "image/jpeg")}, headers={"X-API-Key": KEY})
    assert r.status_code == 201 and r.json()["name"] == "new0.jpg"
    # delete a gallery image and the added one
    _error(httpx.delete(url + "/items/g_2_1.jpg"), 401)
    assert httpx.delete(url + "/items/g_2_1.jpg", headers={"X-API-Key": KEY}).json() == {"deleted": "g_2_1.jpg", "count": 13}
    _error(httpx.delete(url + "/items/g_2_1.jpg", headers={"X-API-Key": KEY}), 404)
    names = [h["name"] for h in _search(server, _jpeg(collection / "gallery" / "g_2_1.jpg"), k=13).json()["results"]]
    assert "g_2_1.jpg" not in names and len(names) == 13
    _error(httpx.get(url + "/images/g_2_1.jpg"), 404)
    assert httpx.get(url + "/stats").json()["items"] == 13

    # a restarted server replays the journal
    server.stop()
    server.start()
    assert httpx.get(url.rsplit(":", 1)[0] + f":{server.port}/health").json()["items"] == 13
    names = [h["name"] for h in _search(server, new, k=13).json()["results"]]
    assert names[0] == "added/new1.jpg" and "new0.jpg" in names and "g_2_1.jpg" not in names
    # re-adding a deleted name works; a torn last journal line is ignored
    assert httpx.post(server.url + "/items", files={"file": ("g.jpg", _jpeg(collection / "gallery" / "g_2_1.jpg"), "image/jpeg")},
                      data={"name": "g_2_1.jpg"}, headers={"X-API-Key": KEY}).status_code == 201
    server.stop()
    with open(collection / "col" / "journal.jsonl", "ab") as f:
        f.write(b'{"op":"add","name":"torn.jpg","feat')
    server.start()
    assert httpx.get(server.url + "/health").json()["items"] == 14


def test_concurrent_searches_and_writes(server, collection):
    gallery = sorted((collection / "gallery").glob("*.jpg"))
    errors, done = [], []
    before = httpx.get(server.url + "/stats").json()["items"]

    def searcher(i):
        with httpx.Client(timeout=60) as c:
            for j in range(6):
                p = gallery[(i + j) % len(gallery)]
                r = c.post(server.url + "/search", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, data={"k": "5"})
                (done if r.status_code == 200 and len(r.json()["results"]) == 5 else errors).append(r.status_code)

    def writer():
        with httpx.Client(timeout=60) as c:
            for j in range(4):
                r = c.post(server.url + "/items", files={"file": ("w.jpg", gallery[j].read_bytes(), "image/jpeg")},
                           data={"name": f"conc/w{j}.jpg"}, headers={"X-API-Key": KEY})
                (done if r.status_code == 201 else errors).append(r.status_code)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(6)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 40
    assert httpx.get(server.url + "/stats").json()["items"] == before + 4


def test_request_timeout_and_internal_errors(collection, tmp_path):
    """A request running past --timeout gets 504, and a bug 500 without a traceback, both in the
    common error shape (in-process server)."""
    import uvicorn

    from lookalike.serve import SearchService, ServeConfig, create_app, server_config

    shutil.copytree(collection / "col", tmp_path / "col", ignore=shutil.ignore_patterns("journal.jsonl", "items"))
    service = SearchService(tmp_path / "col", ServeConfig(timeout=0.3, threads=1))
    real = service.search

    def search(img, k):
        if k == 2:
            raise RuntimeError("secret internal detail")
        if k == 3:
            time.sleep(1.0)
        return real(img, k)

    service.search = search
    port = _free_port()
    srv = uvicorn.Server(server_config(create_app(service), service.config, port=port, log_level="critical"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/search"
        files = {"file": ("q.jpg", _jpeg(collection / "gallery" / "g_0_0.jpg"), "image/jpeg")}
        _error(httpx.post(url, timeout=30, files=files, data={"k": "3"}), 504, "longer than")
        r = httpx.post(url, timeout=30, files=files, data={"k": "2"})
        _error(r, 500, "internal error")
        assert "secret internal detail" not in r.text and "RuntimeError" not in r.text
        assert httpx.post(url, timeout=30, files=files, data={"k": "1"}).status_code == 200
    finally:
        srv.should_exit = True
        t.join(10)


def test_serve_errors_are_one_line(tmp_path):
    p = lookalike_cli("serve", tmp_path / "missing")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in p.stderr


CHROMIUM = "/usr/bin/chromium"


def test_browser_upload_shows_grid(server, collection, tmp_path):
    """Headless Chromium (Debian's, driven by Playwright) uploads a photo on the page and sees the grid."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("LOOKALIKE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} missing but LOOKALIKE_REQUIRE_BROWSER is set (apt-get install chromium)")
        pytest.skip("Debian chromium not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
            page.goto(server.url + "/")
            page.fill("#k", "4")
            page.set_input_files("#file", str(collection / "gallery" / "g_1_2.jpg"))
            page.wait_for_selector(".hit", timeout=30_000)
            page.wait_for_function("document.querySelectorAll('.hit img').length === 4 && "
                                   "[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=30_000)
            names = page.locator(".hit .name").all_inner_texts()
            assert names[0] == "g_1_2.jpg" and len(names) == 4
            assert page.is_visible("#query")
            assert "results in" in page.inner_text("#status")
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
            page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
            # an upload that is not an image shows the server's message
            bad = tmp_path / "notes.jpg"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#status.err", timeout=30_000)
            assert "not an image" in page.inner_text("#status")
        finally:
            browser.close()
    assert (tmp_path / "phone.png").stat().st_size > 1000


def test_batched_search_matches_brute_force(collection, tmp_path):
    """Concurrent requests, embedded in one network batch and answered by one index scan == each
    photo embedded alone + numpy brute force, deletions excluded (the requests must really have
    been grouped)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from lookalike.serve import SearchService, ServeConfig
    from lookalike.store import read_store

    shutil.copytree(collection / "col", tmp_path / "col", ignore=shutil.ignore_patterns("journal.jsonl", "items"))
    service = SearchService(tmp_path / "col", ServeConfig(threads=1))
    store = read_store(collection / "g.h5")
    service.delete("g_1_1.jpg")
    imgs = [Image.open(collection / "gallery" / n).convert("RGB").rotate(8) for n in ("g_0_0.jpg", "g_1_0.jpg", "g_2_1.jpg")]
    q = np.vstack([service.extractor.embed_images([im]) for im in imgs])  # the reference: one photo at a time
    ks = [3, 11, 1]
    sizes = []
    run = service._batcher.run
    service._batcher.run = lambda items, ks_: sizes.append(len(items)) or run(items, ks_)
    service._batcher.busy_wait = 5.0  # (a loaded machine may start the threads slowly)
    with service.arriving(), service.arriving(), service.arriving():  # three requests have begun, as the app counts them
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(service.search, imgs, ks))
    assert sizes == [3] and service._arriving == 0
    sims = q @ store.features.T
    for i, k in enumerate(ks):
        order = [j for j in np.argsort(-sims[i], kind="stable") if store.names[j] != "g_1_1.jpg"][:k]
        assert [h["name"] for h in got[i]] == [store.names[j] for j in order]
        assert np.allclose([h["score"] for h in got[i]], sims[i, order], atol=1e-5)


def test_upload_pixel_cap():
    """A small file that decodes to too many pixels is refused before decoding (413)."""
    from lookalike.serve import HTTPError, decode_upload

    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 10, 10)).save(buf, "PNG")
    assert decode_upload(buf.getvalue(), 10 ** 6).size == (400, 300)
    with pytest.raises(HTTPError) as e:
        decode_upload(buf.getvalue(), 100_000)
    assert e.value.status == 413 and "400x300" in e.value.message


# ------------------------------------------------------------------ attacks on the CLI server
# (more, in-process with small limits: test_serve_security.py)

def test_foreign_host_names_are_refused(server):
    """DNS rebinding: a page at evil.example whose name resolves to 127.0.0.1 reaches the server
    with `Host: evil.example`; only the server's own names are answered."""
    for host in ["evil.example", f"evil.example:{server.port}", "127.0.0.1.nip.io"]:
        status, headers, body = _raw_get(server.port, "/health", host=host)
        assert status == 400 and headers["content-type"].startswith("application/json"), (host, status, body)
        assert b"not served here" in body and b"--allowed-host" in body
    for host in [f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}"]:
        assert _raw_get(server.port, "/health", host=host)[0] == 200, host


def test_cross_site_writes_are_refused(server, collection):
    """A write whose Origin is another site is refused before its body is read, even with the key."""
    files = {"file": ("x.jpg", _jpeg(collection / "extra" / "new_0_70.jpg"), "image/jpeg")}
    for origin in ["http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"]:
        headers = {"X-API-Key": KEY, "Origin": origin}
        _error(httpx.post(server.url + "/items", files=files, data={"name": "csrf.jpg"}, headers=headers), 403, "cross-site")
        _error(httpx.delete(server.url + "/items/g_0_0.jpg", headers=headers), 403, "cross-site")
    names = [h["name"] for h in _search(server, files["file"][1], k=20).json()["results"]]
    assert "csrf.jpg" not in names and "g_0_0.jpg" in names
    # the server's own page may write (same origin): past every check, an unknown name is a 404
    _error(httpx.delete(server.url + "/items/nope.jpg", headers={"X-API-Key": KEY, "Origin": server.url}), 404)


def test_server_without_key_refuses_writes(collection, tmp_path):
    """`lookalike serve` without --api-key (the default): POST/DELETE /items get 403 and say how to
    allow them; searching works."""
    shutil.copytree(collection / "col", tmp_path / "col", ignore=shutil.ignore_patterns("journal.jsonl", "items"))
    srv = Server(tmp_path / "col", key=None).start()
    try:
        files = {"file": ("x.jpg", _jpeg(collection / "extra" / "new_0_70.jpg"), "image/jpeg")}
        msg = _error(httpx.post(srv.url + "/items", files=files, data={"name": "anon.jpg"}), 403)
        assert "--api-key" in msg and "--allow-anonymous-writes" in msg
        _error(httpx.delete(srv.url + "/items/g_0_0.jpg"), 403, "--api-key")
        assert _search(srv, files["file"][1]).status_code == 200
        assert httpx.get(srv.url + "/health").json()["items"] == 12
    finally:
        srv.stop()
    assert not (tmp_path / "col" / "journal.jsonl").exists()


def test_stuck_connections_do_not_lock_out_clients(server, collection):
    """300 sockets stuck in their request heads: a new client is still served, in JSON. (Old code:
    uvicorn's limit_concurrency=256 counted them and answered every new request with a plain-text 503.)"""
    stuck = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            stuck.append(s)
        r = httpx.get(server.url + "/health", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        assert _search(server, _jpeg(collection / "gallery" / "g_0_0.jpg")).status_code == 200
    finally:
        for s in stuck:
            s.close()


def test_300_concurrent_searches_get_answers_not_resets(server, collection):
    """300 searches at once: each client reads a response, 200 or a JSON 503 with Retry-After (the
    in-flight limit), never a reset or a plain-text 503."""
    req = httpx.Request("POST", server.url + "/search", data={"k": "3"},
                        files={"file": ("q.jpg", _jpeg(collection / "gallery" / "g_1_1.jpg"), "image/jpeg")})
    body = req.read()
    request = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n"
               f"Content-Type: {req.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            s.sendall(request)
            socks.append(s)
        answers = [_read_response(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 64, statuses
    for status, headers, data in answers:
        assert headers["content-type"].startswith("application/json"), (status, headers, data[:100])
        assert status == 200 or headers.get("retry-after") == "1"
    assert _search(server, _jpeg(collection / "gallery" / "g_0_0.jpg")).status_code == 200


def test_batcher_waits_for_the_expected_requests_only():
    """A lone request is answered at once; after a call that answered several, or while the server
    counts requests on their way, the next call waits for that many (at most ``busy_wait``)."""
    from lookalike.serve.batcher import Batcher

    calls, on_the_way = [], [0]
    b = Batcher(lambda items, ks: calls.append(list(items)) or [i * 10 for i in items], busy_wait=2.0,
                expected=lambda: on_the_way[0])
    try:
        assert b.submit(1, 1).result(timeout=5) == 10
        late = [b.submit(2, 1)]
        time.sleep(0.3)  # the previous call answered one request, none is expected: 2 goes alone
        late.append(b.submit(3, 1))
        assert [f.result(timeout=5) for f in late] == [20, 30] and calls == [[1], [2], [3]]
        b.last_size = 2  # as after a call that answered two
        late = [b.submit(4, 1)]
        time.sleep(0.3)  # 5 joins 4
        late.append(b.submit(5, 1))
        assert [f.result(timeout=5) for f in late] == [40, 50] and calls[-1] == [4, 5]
        on_the_way[0] = 3  # the last call answered two, the server counts three on their way
        t0 = time.monotonic()
        late = [b.submit(6, 1), b.submit(7, 1)]
        time.sleep(0.3)
        late.append(b.submit(8, 1))
        assert [f.result(timeout=5) for f in late] == [60, 70, 80] and calls[-1] == [6, 7, 8]
        assert time.monotonic() - t0 < 1.5  # it went as soon as the third came, not at busy_wait
        on_the_way[0] = 0
        b.last_size, b.busy_wait = 4, 0.2  # expected four, only one comes: it goes after busy_wait
        t0 = time.monotonic()
        assert b.submit(9, 1).result(timeout=5) == 90 and calls[-1] == [9]
        assert 0.15 < time.monotonic() - t0 < 1.5
    finally:
        b.close()


def test_arriving_is_given_back_and_blas_threads_are_limited_only_during_a_search(collection, tmp_path):
    """The arrival count comes back to 0 when a request fails; numpy's BLAS runs one thread during a
    search and gets its threads back after; faiss's thread count is never touched."""
    import faiss
    from PIL import Image
    from threadpoolctl import threadpool_info

    from lookalike.serve import SearchService, ServeConfig

    def threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] in ("blas", "openmp")}

    shutil.copytree(collection / "col", tmp_path / "col", ignore=shutil.ignore_patterns("journal.jsonl", "items"))
    service = SearchService(tmp_path / "col", ServeConfig(threads=1))
    try:
        before, faiss_before = threads(), faiss.omp_get_max_threads()
        with pytest.raises(RuntimeError):
            with service.arriving():
                raise RuntimeError("the request failed")
        assert service._arriving == 0
        seen = []
        real = service.col.search
        service.col.search = lambda *a, **kw: seen.append(threads()) or real(*a, **kw)
        service.search(Image.open(collection / "gallery" / "g_0_0.jpg").convert("RGB"), 3)
        assert seen and any(n == 1 and "faiss" not in path for path, n in seen[0].items())
        assert all(n == before[path] for path, n in seen[0].items() if "faiss" in path)
        assert threads() == before and faiss.omp_get_max_threads() == faiss_before
    finally:
        service.close()
