"""`eclip serve` over real HTTP on 127.0.0.1: every endpoint, every kind of bad input, the token,
the upload limit, concurrent requests sharing one forward pass, the access log, and SIGTERM.

Two servers: `live_server` (conftest: in this process, no token) and `cli_server` (the real
`python -m eclip serve` command in a subprocess, with --token-env and --max-upload-mb 1)."""
import io
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from eclip.cli import app

TOKEN = "tok-" + secrets.token_hex(16)


def jpeg(path) -> bytes:
    return open(path, "rb").read()


def post_match(url, images, captions, threshold=None, headers=None):
    """images: [(file name, bytes)]."""
    data = {"caption": list(captions)}
    if threshold is not None:
        data["threshold"] = str(threshold)
    files = [("image", (name, content, "image/jpeg")) for name, content in images]
    return httpx.post(f"{url}/match", files=files, data=data, headers=headers, timeout=60)


def cli_json(*args):
    result = CliRunner(mix_stderr=False).invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1), (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def decompression_bomb() -> bytes:
    """A real PNG bomb: 10000 x 10000 black pixels (100 M, over Pillow's 89 M limit) in ~100 kB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    side = 10_000
    packer, row = zlib.compressobj(9), b"\0" * (side + 1)     # filter byte + one grey byte per pixel
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# ---- POST /match ------------------------------------------------------------------------------

def test_match_answers_exactly_like_eclip_match_json(live_server, checkpoint, real_images):
    images = [real_images["astronaut"], real_images["rocket"]]
    captions = ["an astronaut in a spacesuit", "a rocket on the launch pad", "a cup of coffee"]
    got = post_match(live_server.url, [(p.name, jpeg(p)) for p in images], captions, threshold=0.01)
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    got = got.json()
    want = cli_json("match", "--json", "--checkpoint", checkpoint[0], "--threshold", "0.01",
                    "-i", images[0], "-i", images[1], *captions)
    for r in want["results"]:                      # the CLI names images by path, the server by file name
        r["image"] = os.path.basename(r["image"])
    want["best"]["image"] = os.path.basename(want["best"]["image"])
    assert got.keys() == want.keys()
    assert [[m["text"] for m in r["matches"]] for r in got["results"]] == \
        [[m["text"] for m in r["matches"]] for r in want["results"]]
    np.testing.assert_allclose([m["score"] for r in got["results"] for m in r["matches"]],
                               [m["score"] for r in want["results"] for m in r["matches"]], atol=1e-5)
    assert {k: v for k, v in got["best"].items() if k != "score"} == \
        {k: v for k, v in want["best"].items() if k != "score"}
    assert (got["threshold"], got["passed"], got["logit_scale"]) == \
        (want["threshold"], want["passed"], pytest.approx(want["logit_scale"]))


@pytest.fixture(scope="module")
def bad_files(real_images):
    photo = jpeg(real_images["astronaut"])
    return {"text": b"these are not pixels\n" * 50, "truncated": photo[:len(photo) * 6 // 10], "empty": b"",
            "bomb": decompression_bomb()}


@pytest.mark.parametrize("case, expect", [
    ("not an image", (400, "notes.txt: not an image")),
    ("truncated", (400, "cut.jpg: truncated")),
    ("empty", (400, "empty.jpg: empty file")),
    ("bomb", (400, "bomb.png: decompression bomb (100000000 pixels)")),
    ("caption too long", (400, "caption: 1001 characters, at most 1000")),
    ("empty caption", (400, "caption 2: empty")),
    ("no caption", (400, "no caption")),
    ("no image", (400, "no image")),
    ("image path as text", (400, "image 1: must be a file upload")),
    ("caption as file", (400, "caption: must be a text field, not a file")),
    ("threshold not a number", (400, "threshold='high': not a number")),
    ("threshold out of range", (400, "threshold=5.0: must be between -1.0 and 1.0")),
    ("json body", (400, "send multipart/form-data")),
    ("malformed multipart", (400, "malformed request")),
    ("too many images", (400, "Too many files")),
    ("too many captions", (400, "257 captions, at most 256")),
    ("wrong method", (405, "Method Not Allowed: GET /match")),
])
def test_match_refuses_bad_input_with_a_json_4xx_and_keeps_serving(live_server, real_images, bad_files, case, expect):
    url, photo = live_server.url, jpeg(real_images["coffee"])
    one = [("image", ("coffee.jpg", photo, "image/jpeg"))]
    requests = {
        "not an image": dict(files=[("image", ("notes.txt", bad_files["text"], "text/plain"))], data={"caption": "x"}),
        "truncated": dict(files=[("image", ("cut.jpg", bad_files["truncated"], "image/jpeg"))], data={"caption": "x"}),
        "empty": dict(files=[("image", ("empty.jpg", b"", "image/jpeg"))], data={"caption": "x"}),
        "bomb": dict(files=[("image", ("bomb.png", bad_files["bomb"], "image/png"))], data={"caption": "x"}),
        "caption too long": dict(files=one, data={"caption": "a" * 1001}),
        "empty caption": dict(files=one, data={"caption": ["fine", "  "]}),
        "no caption": dict(files=one, data={}),
        "no image": dict(files=[("other", ("x.jpg", photo, "image/jpeg"))], data={"caption": "x"}),
        "image path as text": dict(files=[("caption", (None, "x"))], data={"image": str(real_images["astronaut"])}),
        "caption as file": dict(files=one + [("caption", ("c.txt", b"a caption", "text/plain"))]),
        "threshold not a number": dict(files=one, data={"caption": "x", "threshold": "high"}),
        "threshold out of range": dict(files=one, data={"caption": "x", "threshold": "5"}),
        "json body": dict(json={"image": str(real_images["astronaut"]), "caption": "x"}),
        "malformed multipart": dict(content=b"--zz\r\n\r\nno boundary declared",
                                    headers={"content-type": "multipart/form-data"}),
        "too many images": dict(files=one * 17, data={"caption": "x"}),
        "too many captions": dict(files=one, data={"caption": [f"c{k}" for k in range(257)]}),
    }
    if case == "wrong method":
        response = httpx.get(f"{url}/match", timeout=30)
    else:
        response = httpx.post(f"{url}/match", timeout=30, **requests[case])
    status, message = expect
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    assert message in response.json()["error"], response.json()
    assert str(real_images["astronaut"]) not in response.text
    again = post_match(url, [("coffee.jpg", photo)], ["a cup of coffee"])   # the server goes on
    assert again.status_code == 200 and again.json()["results"][0]["matches"][0]["text"] == "a cup of coffee"


# ---- /search and /image -----------------------------------------------------------------------

def test_search_by_caption_ranks_like_eclip_match_gallery(live_server, serve_gallery):
    folder, _ = serve_gallery
    got = httpx.get(f"{live_server.url}/search", params={"q": "a cat on a sofa", "k": 3}, timeout=30)
    assert got.status_code == 200
    got = got.json()
    want = cli_json("match", "--gallery", folder, "a cat on a sofa", "--top-k", "3", "--json")
    r, w = got["results"][0], want["results"][0]
    assert (r["kind"], r["searched"], got["counts"]) == ("text", "images", {"images": 4, "texts": 4})
    assert [m["id"] for m in r["matches"]] == [m["id"] for m in w["matches"]]
    np.testing.assert_allclose([m["score"] for m in r["matches"]], [m["score"] for m in w["matches"]], atol=1e-5)
    for m in r["matches"]:
        assert m["thumbnail"] == f"/image/{m['row']}"
        thumb = httpx.get(live_server.url + m["thumbnail"], timeout=30)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        picture = Image.open(io.BytesIO(thumb.content))
        original = Image.open(m["path"])
        assert max(picture.size) == 256 and abs(picture.width / picture.height - original.width / original.height) < 0.02


def test_search_by_photo_finds_the_same_photo_first_and_captions(live_server, serve_gallery, real_images):
    photo = real_images["rocket"]
    files = [("image", ("query.jpg", jpeg(photo), "image/jpeg"))]
    found = httpx.post(f"{live_server.url}/search", files=files, data={"k": "2"}, timeout=30).json()
    best = found["results"][0]["matches"][0]
    assert found["results"][0]["kind"] == "image" and len(found["results"][0]["matches"]) == 2
    assert best["path"] == str(photo.resolve()) and best["score"] == pytest.approx(1.0, abs=1e-4)
    texts = httpx.post(f"{live_server.url}/search", files=files, data={"target": "texts", "k": "4"}, timeout=30).json()
    want = cli_json("match", "--gallery", serve_gallery[0], photo, "--json", "-k", "4")
    assert [m["text"] for m in texts["results"][0]["matches"]] == [m["text"] for m in want["results"][0]["matches"]]


@pytest.mark.parametrize("request_, status, message", [
    (("GET", "/search", {"params": {"q": ""}}), 400, "q: empty"),
    (("GET", "/search", {"params": {"q": "x" * 1001}}), 400, "at most 1000"),
    (("GET", "/search", {"params": {"q": "a cat", "k": "0"}}), 400, "k=0: must be between 1 and 100"),
    (("GET", "/search", {"params": {"q": "a cat", "k": "many"}}), 400, "k='many': not a whole number"),
    (("POST", "/search", {"data": {"k": "3"}, "files": [("x", ("a", b"", "text/plain"))]}), 400,
     "exactly one file in the field 'image' (0 sent)"),
    (("POST", "/search", {"data": {"target": "faces"}, "files": "PHOTO"}), 400, "target='faces': images or texts"),
    (("GET", "/image/4", {}), 404, "no gallery image 4"),
    (("GET", "/image/-1", {}), 404, "Not Found"),
    (("GET", "/image/..%2F..%2Fetc%2Fpasswd", {}), 404, "Not Found"),
    (("GET", "/static/..%2F__init__.py", {}), 404, "Not Found"),
    (("GET", "/static/app.py", {}), 404, "no such file"),
    (("GET", "/nowhere", {}), 404, "Not Found: GET /nowhere"),
])
def test_search_and_image_refuse_bad_requests(live_server, real_images, request_, status, message):
    method, path, kw = request_
    if kw.get("files") == "PHOTO":
        kw = {**kw, "files": [("image", ("a.jpg", jpeg(real_images["coffee"]), "image/jpeg"))]}
    response = httpx.request(method, live_server.url + path, timeout=30, **kw)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_a_file_path_sent_as_a_query_is_only_text(live_server, real_images):
    """Unlike `eclip match --gallery PATH`, the server never opens a file a client names."""
    path = str(real_images["chelsea"])
    result = httpx.get(f"{live_server.url}/search", params={"q": path}, timeout=30).json()["results"][0]
    assert (result["kind"], result["query"]) == ("text", path)


def test_health_page_and_static_files(live_server, serve_gallery):
    health = httpx.get(f"{live_server.url}/health", timeout=30).json()
    from eclip import __version__
    assert health["status"] == "ok" and health["version"] == __version__
    assert health["gallery"] == {"images": 4, "texts": 4}
    assert health["model"]["checkpoint"] == "tiny.safetensors" and len(health["model"]["checkpoint_sha256"]) == 64
    assert "/" not in json.dumps(health["model"]).replace("\\/", "")     # no path of this machine
    page = httpx.get(live_server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/page.js"' in page.text and "http://" not in page.text and "https://" not in page.text
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        response = httpx.get(f"{live_server.url}/static/{name}", timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text     # no external URL


def test_a_server_without_gallery_says_so(checkpoint):
    from eclip.config import ModelSpec
    from eclip.match import Matcher
    from eclip.serve import Server, ServeOptions
    server = Server(Matcher.from_spec(ModelSpec(checkpoint=str(checkpoint[0]), device="cpu")), ServeOptions(port=0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert server.started.wait(60)
        response = httpx.get(f"{server.url}/search", params={"q": "a cat"}, timeout=30)
        assert response.status_code == 404 and "--gallery DIR" in response.json()["error"]
        assert httpx.get(f"{server.url}/image/0", timeout=30).status_code == 404
        assert httpx.get(f"{server.url}/health", timeout=30).json()["gallery"] is None
    finally:
        server.stop()
        thread.join(30)


# ---- concurrency ------------------------------------------------------------------------------

def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(live_server, real_images):
    names = ["astronaut", "rocket", "coffee", "chelsea"]
    jobs = [([(f"{names[i % 4]}.jpg", jpeg(real_images[names[i % 4]]))], [f"caption {i}", f"another caption {i % 3}"])
            for i in range(16)]
    alone = [post_match(live_server.url, images, captions).json() for images, captions in jobs]
    before = httpx.get(f"{live_server.url}/health", timeout=30).json()["batching"]
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait()
        return post_match(live_server.url, *job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(send, jobs))
    after = httpx.get(f"{live_server.url}/health", timeout=30).json()["batching"]
    assert [r.status_code for r in together] == [200] * len(jobs)
    for got, want in zip((r.json() for r in together), alone):
        assert got["results"][0]["image"] == want["results"][0]["image"]
        assert [m["text"] for m in got["results"][0]["matches"]] == [m["text"] for m in want["results"][0]["matches"]]
        np.testing.assert_allclose([m["score"] for m in got["results"][0]["matches"]],
                                   [m["score"] for m in want["results"][0]["matches"]], atol=1e-5)
    assert after["jobs"] - before["jobs"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs) and after["largest_batch"] >= 2, (before, after)


# ---- the real command: token, upload limit, access log, SIGTERM -------------------------------

@pytest.fixture(scope="module", autouse=True)
def cli_process(checkpoint, serve_gallery):
    """Started with the module, so that its imports overlap the in-process tests above."""
    env = {**os.environ, "ECLIP_TEST_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eclip", "serve", "--checkpoint", str(checkpoint[0]),
                             "--gallery", str(serve_gallery[0]), "--port", "0", "--token-env", "ECLIP_TEST_TOKEN",
                             "--max-upload-mb", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cli_server(cli_process):
    proc, lines, listening = cli_process, [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if "listening on http://" in line:
                listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    listening.wait(300)
    url = next((line.split("listening on ")[1].split()[0] for line in lines if "listening on" in line), None)
    assert url, "\n".join(lines)
    server = SimpleNamespace(url=url, proc=proc, lines=lines, requests=0, reader=reader)

    def call(method, path, **kw):
        server.requests += 1
        return httpx.request(method, url + path, timeout=60, **kw)

    server.call = call
    return server


def test_binds_127_0_0_1_by_default(cli_server):
    assert cli_server.url.startswith("http://127.0.0.1:")


def test_token_guards_every_endpoint_but_health(cli_server, real_images):
    call, bearer = cli_server.call, {"Authorization": f"Bearer {TOKEN}"}
    photo = [("image", ("coffee.jpg", jpeg(real_images["coffee"]), "image/jpeg"))]
    assert call("GET", "/health").status_code == 200
    for method, path, kw in (("GET", "/", {}), ("GET", "/static/page.js", {}), ("GET", "/search?q=a+cat", {}),
                             ("GET", "/image/0", {}), ("POST", "/match", {"files": photo, "data": {"caption": "x"}}),
                             ("POST", "/search", {"files": photo})):
        for headers in ({}, {"Authorization": "Bearer wrong-" + TOKEN}, {"Authorization": TOKEN},
                        {"Authorization": f"Bearer {TOKEN[:-1]}"}):
            refused = call(method, path, headers=headers, **kw)
            assert refused.status_code == 401 and "token" in refused.json()["error"], (path, headers)
        page = path in ("/", "/static/page.js")     # a browser opens these itself: it is asked for Basic auth
        assert refused.headers["www-authenticate"] == ('Basic realm="eclip"' if page else 'Bearer realm="eclip"')
        assert call(method, path, headers=bearer, **kw).status_code == 200, path
    assert call("GET", "/", auth=("anyone", TOKEN)).status_code == 200          # a browser's Basic auth
    assert call("GET", "/", auth=("anyone", "not-" + TOKEN)).status_code == 401


def test_upload_over_the_limit_is_refused_with_413(cli_server, real_images):
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "PNG")
    assert out.tell() > 2 ** 20
    response = cli_server.call("POST", "/match", headers={"Authorization": f"Bearer {TOKEN}"},
                               files=[("image", ("noise.png", out.getvalue(), "image/png"))], data={"caption": "x"})
    assert response.status_code == 413 and "larger than 1 MB" in response.json()["error"]
    assert cli_server.call("GET", "/health").status_code == 200


def test_upload_limit_holds_while_the_body_streams_in(cli_server):
    """A chunked 64 MB upload (no Content-Length): answered 413 long before the client is done."""
    host, port = cli_server.url.rsplit("/", 1)[1].split(":")
    cli_server.requests += 1
    sock = socket.create_connection((host, int(port)), timeout=30)
    answer = []
    reader = threading.Thread(target=lambda: answer.append(_read_all(sock)), daemon=True)
    reader.start()
    sock.sendall(f"POST /match HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: multipart/form-data; boundary=BOUNDARY\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    head = b'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
    block, sent, total = b"\xff" * 65536, 0, 64 * 2 ** 20
    try:
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        while sent < total:
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)
    except OSError:    # the server stopped reading and closed
        pass
    reader.join(30)
    sock.close()
    assert answer and answer[0].startswith(b"HTTP/1.1 413"), answer[:1]
    assert b"larger than 1 MB" in answer[0]
    assert sent < total
    assert cli_server.call("GET", "/health").status_code == 200


def _read_all(sock) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def test_sigterm_finishes_the_request_in_flight_and_exits_0(cli_server, real_images):
    """SIGTERM arrives while a request's body is half sent: that request is still answered."""
    request = httpx.Request("POST", cli_server.url + "/match", headers={"Authorization": f"Bearer {TOKEN}"},
                            files=[("image", ("coffee.jpg", jpeg(real_images["coffee"]), "image/jpeg"))],
                            data={"caption": "a cup of coffee"})
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    host, port = cli_server.url.rsplit("/", 1)[1].split(":")
    cli_server.requests += 1
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /match HTTP/1.1\r\n{head}\r\n".encode() + body[:len(body) // 2])
        time.sleep(1.0)
        cli_server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        sock.sendall(body[len(body) // 2:])
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["best"]["text"] == "a cup of coffee"
    assert cli_server.proc.wait(60) == 0


def test_after_stopping_one_log_line_per_request_and_no_token(cli_server):
    proc = cli_server.proc
    assert proc.wait(60) == 0
    cli_server.reader.join(10)
    log = cli_server.lines
    assert log[-1] == "eclip serve: stopped"
    access = [line for line in log if line.startswith("127.0.0.1:")]
    assert len(access) == cli_server.requests, "\n".join(log)
    assert all(' HTTP/1.1" ' in line and line.endswith("ms") for line in access)
    assert not any("Traceback" in line or TOKEN in line for line in log)
    assert TOKEN not in proc.stdout.read()


# ---- options checked before the model loads ---------------------------------------------------

def test_option_errors_exit_2_with_one_line_before_loading(tmp_path, checkpoint, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    monkeypatch.delenv("ECLIP_NO_SUCH_TOKEN", raising=False)
    monkeypatch.setenv("ECLIP_SHORT_TOKEN", "abc")
    cases = [(["--token-env", "ECLIP_NO_SUCH_TOKEN"], "--token-env ECLIP_NO_SUCH_TOKEN: that environment variable"),
             (["--token-env", "ECLIP_SHORT_TOKEN"], "shorter than 16 characters"),
             (["--port", "70000"], "--port 70000: must be between 0 and 65535"),
             (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be more than 0"),
             (["--gallery", str(tmp_path / "none")], "no such embeddings folder"),
             (["--port", str(busy.getsockname()[1])], "cannot listen there")]
    from eclip.match import Matcher
    loads = []
    monkeypatch.setattr(Matcher, "from_spec", classmethod(lambda cls, spec, engine=None: loads.append(spec)))
    try:
        for args, message in cases:
            result = CliRunner(mix_stderr=False).invoke(app, ["serve", "--checkpoint", str(checkpoint[0]), *args])
            assert result.exit_code == 2 and message in result.stderr, (args, result.stderr, result.exception)
            assert len(result.stderr.strip().splitlines()) == 1 and "abc" not in result.stderr
            assert loads == [], args      # refused before any model was loaded
    finally:
        busy.close()


def test_model_and_search_options_reach_the_server(monkeypatch):
    import eclip.serve
    got = []
    monkeypatch.setattr(eclip.serve, "serve", lambda spec, options: got.append((spec, options)))
    result = CliRunner(mix_stderr=False).invoke(app, ["serve", "--model", "ViT-B-32", "--pretrained", "none",
                                                      "--seed", "7", "--engine", "torch", "--search", "exact"])
    assert result.exit_code == 0, result.stderr
    spec, options = got[0]
    assert (spec.seed, spec.pretrained, options.engine, options.search) == (7, "none", "torch", "exact")
    bad = CliRunner(mix_stderr=False).invoke(app, ["serve", "--search", "fastest"])
    assert bad.exit_code == 2 and "--search" in bad.stderr


SERVE_ON_MAIN = """
import json, os, signal, sys, threading
import httpx
from eclip.config import ModelSpec
from eclip.match import Matcher
from eclip.serve import Server, ServeOptions
matcher = Matcher.from_spec(ModelSpec(checkpoint=sys.argv[1], device="cpu"))
threads, encode = [], matcher.encode_pixels
def recording(pixels):
    threads.append(threading.current_thread() is threading.main_thread())
    return encode(pixels)
matcher.encode_pixels = recording
server = Server(matcher, ServeOptions(port=0))
def client():
    server.started.wait(60)
    with open(sys.argv[2], "rb") as f:
        files = [("image", ("cat.jpg", f.read(), "image/jpeg"))]
    codes = [httpx.post(server.url + "/match", files=files, data={"caption": "a cat"}, timeout=60).status_code
             for _ in range(3)]
    print(json.dumps({"codes": codes}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=client, daemon=True).start()
server.run()
print(json.dumps({"on_main_thread": threads}), flush=True)
"""


def test_on_the_main_thread_the_model_runs_there_and_sigterm_ends_run(checkpoint, real_images):
    """Server.run on the main thread (as `eclip serve` calls it) keeps the forward passes there:
    torch's OpenMP runs 1.4x slower on 2 cores when a second thread starts its parallel regions
    (eclip.serve.batching). SIGTERM then ends run() normally."""
    proc = subprocess.run([sys.executable, "-c", SERVE_ON_MAIN, str(checkpoint[0]), str(real_images["chelsea"])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0] == {"codes": [200, 200, 200]}
    assert lines[1] == {"on_main_thread": [True, True, True]}
