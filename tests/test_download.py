"""Download and extraction against a local HTTP server on 127.0.0.1 serving test-built tarballs."""
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from breakhis.data.demo import make_demo
from breakhis.data.download import check_member, download_and_extract
from breakhis.errors import UserError


class Handler(BaseHTTPRequestHandler):
    """Serves `files` (url path -> bytes) with optional Range support and a cut-off."""

    files: dict = {}
    honour_range = True
    cut_after = None  # bytes of body sent before the connection is dropped
    log: list = []  # (path, Range header, body bytes sent)

    def do_GET(self):
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        if data is None:
            self.send_error(404, "Not Found")
            self.log.append((self.path, rng, 0))
            return
        start, status = 0, 200
        if rng and self.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.log.append((self.path, rng, 0))
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body = body[: self.cut_after]
            self.close_connection = True
        self.wfile.write(body)
        self.log.append((self.path, rng, len(body)))

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("H", (Handler,), {"files": {}, "log": [], "honour_range": True, "cut_after": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def demo_tarball(tmp_path) -> tuple[bytes, dict]:
    """A gzipped tar of a tiny BreaKHis_v1 tree; returns it and {relative path: bytes}."""
    root = make_demo(tmp_path / "src", patients=4, images_per_patient=2, size=(32, 24))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname="BreaKHis_v1")
    files = {p.relative_to(root.parent).as_posix(): p.read_bytes() for p in root.rglob("*.png")}
    return buf.getvalue(), files


def add(tar, name, data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def everything(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_full_download_and_extract(tmp_path, server):
    url, h = server
    h.files["/BreaKHis_v1.tar.gz"], files = demo_tarball(tmp_path)
    dest = tmp_path / "out"
    top = download_and_extract(url + "/BreaKHis_v1.tar.gz", dest, progress=False)
    assert top == dest / "BreaKHis_v1"
    assert len(files) == 8
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert (dest / "BreaKHis_v1.tar.gz").read_bytes() == h.files["/BreaKHis_v1.tar.gz"]
    assert not list(dest.glob("*.part")) and not list(dest.glob(".tmp-*"))
    assert h.log == [("/BreaKHis_v1.tar.gz", None, len(h.files["/BreaKHis_v1.tar.gz"]))]
    # a second run neither downloads nor extracts again
    (dest / next(iter(files))).unlink()
    assert download_and_extract(url + "/BreaKHis_v1.tar.gz", dest, progress=True) == top
    assert len(h.log) == 1 and not (dest / next(iter(files))).exists()


def test_resume_sends_range_and_appends(tmp_path, server):
    url, h = server
    data, files = demo_tarball(tmp_path)
    h.files["/a.tar.gz"] = data
    dest = tmp_path / "out"
    dest.mkdir()
    k = len(data) // 3
    (dest / "a.tar.gz.part").write_bytes(data[:k])
    top = download_and_extract(url + "/a.tar.gz", dest, progress=True)
    assert h.log == [("/a.tar.gz", f"bytes={k}-", len(data) - k)]  # only the rest was sent
    assert (dest / "a.tar.gz").read_bytes() == data
    assert all((dest / rel).read_bytes() == b for rel, b in files.items()) and top.name == "BreaKHis_v1"


def test_server_ignoring_range_restarts_cleanly(tmp_path, server):
    url, h = server
    data, _ = demo_tarball(tmp_path)
    h.files["/a.tar.gz"], h.honour_range = data, False
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.tar.gz.part").write_bytes(b"garbage that must not stay in front" * 10)
    download_and_extract(url + "/a.tar.gz", dest, progress=False)
    assert h.log[0][1] is not None  # it asked for a range and got the whole file
    assert (dest / "a.tar.gz").read_bytes() == data


def test_complete_part_file_gets_416_and_is_kept(tmp_path, server):
    url, h = server
    data, _ = demo_tarball(tmp_path)
    h.files["/a.tar.gz"] = data
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.tar.gz.part").write_bytes(data)
    download_and_extract(url + "/a.tar.gz", dest, progress=False)
    assert h.log == [("/a.tar.gz", f"bytes={len(data)}-", 0)]
    assert (dest / "a.tar.gz").read_bytes() == data


def test_dropped_connection_keeps_part_then_resumes(tmp_path, server):
    url, h = server
    data, _ = demo_tarball(tmp_path)
    h.files["/a.tar.gz"], h.cut_after = data, 1000
    dest = tmp_path / "out"
    with pytest.raises(UserError, match="run the same command again to resume"):
        download_and_extract(url + "/a.tar.gz", dest, progress=False)
    assert (dest / "a.tar.gz.part").read_bytes() == data[:1000] and not (dest / "a.tar.gz").exists()
    h.cut_after = None
    download_and_extract(url + "/a.tar.gz", dest, progress=False)
    assert h.log[-1] == ("/a.tar.gz", "bytes=1000-", len(data) - 1000)
    assert (dest / "a.tar.gz").read_bytes() == data


def test_http_error_and_unreachable_server(tmp_path, server):
    url, h = server
    with pytest.raises(UserError, match=r"HTTP 404.*download it by hand.*python -m breakhis.data"):
        download_and_extract(url + "/missing.tar.gz", tmp_path / "out", progress=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(UserError, match=r"download of http://127\.0\.0\.1.* failed: .*by hand"):
        download_and_extract(f"http://127.0.0.1:{port}/x.tar.gz", tmp_path / "out", progress=False)


def test_damaged_archive(tmp_path, server):
    url, h = server
    h.files["/a.tar.gz"] = b"\x1f\x8b this is not really gzip" * 50
    with pytest.raises(UserError, match="damaged or not a tar archive"):
        download_and_extract(url + "/a.tar.gz", tmp_path / "out", progress=False)
    data, _ = demo_tarball(tmp_path)
    h.files["/b.tar.gz"] = data[: len(data) // 2]  # a truncated archive served whole
    with pytest.raises(UserError, match="damaged or not a tar archive"):
        download_and_extract(url + "/b.tar.gz", tmp_path / "out2", progress=False)
    assert everything(tmp_path / "out2") == {"b.tar.gz"}


BAD = [
    ("../evil", dict(type=tarfile.REGTYPE), "'..'"),
    ("BreaKHis_v1/../../evil", dict(type=tarfile.REGTYPE), "'..'"),
    ("/tmp/abs_evil", dict(type=tarfile.REGTYPE), "absolute path"),
    ("BreaKHis_v1/link", dict(type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    ("BreaKHis_v1/hard", dict(type=tarfile.LNKTYPE, linkname="BreaKHis_v1/a.txt"), "hard link"),
    ("BreaKHis_v1/dev", dict(type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device"),
    ("BreaKHis_v1/fifo", dict(type=tarfile.FIFOTYPE), "fifo"),
]


@pytest.mark.parametrize("name,fields,why", BAD, ids=[b[0] for b in BAD])
def test_bad_member_refuses_whole_archive(tmp_path, server, name, fields, why):
    url, h = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar, "BreaKHis_v1/a.txt", b"good file, comes first")  # a naive extractor writes it
        add(tar, name, b"evil" if fields["type"] == tarfile.REGTYPE else b"", **fields)
    h.files["/a.tar.gz"] = buf.getvalue()
    work = tmp_path / "work"
    dest = work / "deep" / "out"
    before = everything(tmp_path)
    with pytest.raises(UserError, match=re.escape(repr(name)) + f".*{re.escape(why)}.*nothing was extracted"):
        download_and_extract(url + "/a.tar.gz", dest, progress=False)
    created = everything(tmp_path) - before
    assert created == {"work", "work/deep", "work/deep/out", "work/deep/out/a.tar.gz"}
    assert not Path("/tmp/abs_evil").exists()


def test_check_member_accepts_plain_files_and_folders():
    f, d = tarfile.TarInfo("BreaKHis_v1/x.png"), tarfile.TarInfo("./BreaKHis_v1")
    d.type = tarfile.DIRTYPE
    assert check_member(f) is None and check_member(d) is None
    assert "absolute" in check_member(tarfile.TarInfo("C:/evil"))
    assert "'..'" in check_member(tarfile.TarInfo("a\\..\\..\\evil"))


def test_existing_folder_is_not_overwritten(tmp_path, server):
    url, h = server
    h.files["/a.tar.gz"], _ = demo_tarball(tmp_path)
    dest = tmp_path / "out"
    (dest / "BreaKHis_v1").mkdir(parents=True)
    (dest / "BreaKHis_v1" / "mine.txt").write_text("user's own")
    with pytest.raises(UserError, match="already exists"):
        download_and_extract(url + "/a.tar.gz", dest, progress=False)
    assert everything(dest) == {"a.tar.gz", "BreaKHis_v1", "BreaKHis_v1/mine.txt"}


def test_several_top_level_entries_return_dest(tmp_path, server):
    url, h = server
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # plain tar, no gzip
        add(tar, "one.txt", b"1")
        add(tar, "sub/two.txt", b"2")
    h.files["/x.tar"] = buf.getvalue()
    dest = tmp_path / "out"
    assert download_and_extract(url + "/x.tar", dest, progress=False) == dest
    assert (dest / "one.txt").read_text() == "1" and (dest / "sub" / "two.txt").read_text() == "2"
