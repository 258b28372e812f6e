"""Source data of `hallulens generate`: resumable download, and each loader on upstream formats.

Downloads go to a local http.server on 127.0.0.1 (Range, If-Range and cut connections under the
test's control); the fixtures under tests/fixtures/sources are invented data in the upstream
layouts, and the .tar.gz/.zip/.parquet forms are built from them here.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from hallulens_tasks.generation import sources
from hallulens_tasks.generation.download import download, source_cache_dir
from hallulens_tasks.generation.errors import ChecksumError, DownloadError, SourceError
from hallulens_tasks.generation.sources import (
    RemoteFile,
    load_goodwiki,
    load_itis,
    load_medicines,
    load_source,
    load_wikirank,
    locate,
    parse_source_args,
    popularity_bins,
)

FIXTURES = Path(__file__).parent / "fixtures" / "sources"
PAYLOAD = random.Random(7).randbytes(300_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- a local server


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.etag = '"v1"'
        self.honour_range = True
        self.cut_after: int | None = None  # send only this many body bytes, once
        self.requests: list[dict] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        entry = {
            "path": self.path,
            "range": self.headers.get("Range"),
            "if_range": self.headers.get("If-Range"),
            "status": None,
            "sent": 0,
        }
        srv.requests.append(entry)
        data = srv.files.get(self.path)
        if data is None:
            entry["status"] = 404
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and srv.honour_range and (if_range is None or if_range == srv.etag):
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            entry["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            entry["status"] = 200
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", srv.etag)
        self.end_headers()
        if srv.cut_after is not None:
            body, srv.cut_after = body[: srv.cut_after], None
        self.wfile.write(body)
        self.wfile.flush()
        entry["sent"] = len(body)


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def dead_url() -> str:
    """A URL on a local port nothing listens on: a download fails at once, offline."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/itisMySQLTables.tar.gz"


# --------------------------------------------------------------------------- download


def test_download_resumes_a_cut_download_with_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after = 100_000
    dest = tmp_path / "cache" / "data.bin"
    part = dest.with_name("data.bin.part")

    with pytest.raises(DownloadError) as cut:
        download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert "100,000 bytes are kept" in str(cut.value)
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not dest.exists()

    got = download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert got == dest and dest.read_bytes() == PAYLOAD
    second = server.requests[-1]
    assert second["range"] == "bytes=100000-" and second["if_range"] == '"v1"'
    assert second["status"] == 206 and second["sent"] == len(PAYLOAD) - 100_000
    assert not part.exists() and not dest.with_name("data.bin.part.json").exists()

    # a third call reuses the file: no request at all
    download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert len(server.requests) == 2


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.honour_range = False
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"stale bytes from an older file")

    download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    (request,) = server.requests
    assert request["range"] == "bytes=30-" and request["status"] == 200
    assert request["sent"] == len(PAYLOAD)


def test_download_refetches_a_file_that_changed_on_the_server(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after = 50_000
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError):
        download(server.url("/data.bin"), dest, progress=False)
    new = bytes(reversed(PAYLOAD))
    server.files["/data.bin"], server.etag = new, '"v2"'

    download(server.url("/data.bin"), dest, progress=False)
    assert dest.read_bytes() == new  # not the old first 50 kB spliced onto the new file
    assert server.requests[-1]["if_range"] == '"v1"' and server.requests[-1]["status"] == 200


def test_download_finishes_a_part_that_is_already_complete(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD)
    download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1]["status"] == 416 and server.requests[-1]["sent"] == 0


def test_download_checksum_mismatch(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download(server.url("/data.bin"), dest, sha256=wrong, progress=False)
    message = str(err.value)
    assert str(dest) in message and wrong in message and sha(PAYLOAD) in message
    assert "\n" not in message
    assert not dest.exists() and not dest.with_name("data.bin.part").exists()
    assert dest.with_name("data.bin.bad").read_bytes() == PAYLOAD

    # a bad file already in the cache is not taken as valid either
    dest.write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=sha(b"tampered")):
        download(server.url("/data.bin"), dest, sha256=sha(PAYLOAD), progress=False)
    assert not dest.exists()


def test_download_progress_line(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    stream = io.StringIO()
    download(server.url("/data.bin"), tmp_path / "data.bin", source="itis", progress=stream)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"itis: 0 / {len(PAYLOAD):,} bytes (0%)"
    assert lines[-1] == f"itis: {len(PAYLOAD):,} / {len(PAYLOAD):,} bytes (100%)"


def test_download_offline_says_what_and_where(dead_url, tmp_path):
    dest = tmp_path / "itis" / "itisMySQLTables.tar.gz"
    with pytest.raises(DownloadError) as err:
        download(dead_url, dest, source="itis", progress=False, timeout=5)
    message = str(err.value)
    assert dead_url in message and str(dest) in message and "--source itis=PATH" in message
    assert "\n" not in message
    assert not dest.exists()


def test_download_http_error_names_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/missing"), tmp_path / "x", progress=False)


# --------------------------------------------------------------------------- locate


@pytest.fixture
def offline_itis(monkeypatch, dead_url):
    spec = replace(sources.SOURCES["itis"], files=(RemoteFile(dead_url, "itisMySQLTables.tar.gz"),))
    monkeypatch.setitem(sources.SOURCES, "itis", spec)
    return dead_url


def test_missing_source_offline_gives_the_clear_message(offline_itis, tmp_path):
    with pytest.raises(DownloadError) as err:
        locate("itis", cache=tmp_path, progress=False)
    message = str(err.value)
    assert offline_itis in message
    assert str(tmp_path / "itis" / "itisMySQLTables.tar.gz") in message
    assert "--source itis=PATH" in message


def test_locate_prefers_local_then_cache(offline_itis, tmp_path, monkeypatch):
    local = tmp_path / "mine.tar.gz"
    local.write_bytes(b"x")
    assert locate("itis", {"itis": local}, cache=tmp_path / "unused") == local
    with pytest.raises(SourceError, match="no such file"):
        locate("itis", {"itis": tmp_path / "absent.tar.gz"})

    cached = tmp_path / "env-cache" / "itis" / "itisMySQLTables.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"y")
    monkeypatch.setenv("HALLULENS_SOURCE_CACHE", str(tmp_path / "env-cache"))
    assert source_cache_dir() == tmp_path / "env-cache"
    assert locate("itis", progress=False) == cached  # no network needed
    assert source_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_load_source_records_url_and_sha256(server, monkeypatch, tmp_path):
    tar_bytes = _itis_tar_bytes()
    server.files["/itis.tar.gz"] = tar_bytes
    spec = replace(
        sources.SOURCES["itis"],
        files=(RemoteFile(server.url("/itis.tar.gz"), "itisMySQLTables.tar.gz", sha(tar_bytes)),),
    )
    monkeypatch.setitem(sources.SOURCES, "itis", spec)
    itis = load_source("itis", cache=tmp_path, progress=False)
    (record,) = itis.provenance
    assert record.sha256 == sha(tar_bytes) and record.origin == server.url("/itis.tar.gz")
    assert record.path == str(tmp_path / "itis" / "itisMySQLTables.tar.gz")
    assert sources.provenance_manifest(itis) == [record.as_dict()]


def test_parse_source_args(tmp_path):
    assert parse_source_args([f"itis={tmp_path}/a.tar.gz", "medicines=m.csv"]) == {
        "itis": tmp_path / "a.tar.gz",
        "medicines": Path("m.csv"),
    }
    with pytest.raises(SourceError, match="unknown source 'itsi'"):
        parse_source_args(["itsi=x"])
    with pytest.raises(SourceError, match="expected NAME=PATH"):
        parse_source_args(["itis"])


# --------------------------------------------------------------------------- GoodWiki


def _goodwiki_rows() -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "goodwiki.jsonl").read_text().splitlines()]


def test_goodwiki_jsonl():
    path = FIXTURES / "goodwiki.jsonl"
    wiki = load_goodwiki(path)
    assert [a["title"] for a in wiki.articles] == [
        "Harbour Lights Festival",
        "Mount Orrin",
        "The Copper Kettle (novel)",
        "Elsbeth Varga",
    ]
    assert wiki.articles[1]["document"].startswith("**Mount Orrin** is a dormant volcano")
    assert wiki.articles[0]["pageid"] == 9101 and wiki.articles[0]["categories"] == ["Festivals"]
    assert wiki.provenance[0].sha256 == sha(path.read_bytes())


def test_goodwiki_markdown_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _goodwiki_rows()
    hf_rows = [
        {**{k: v for k, v in r.items() if k != "document"}, "markdown": r["document"]} for r in rows
    ]
    jsonl = tmp_path / "goodwiki.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in hf_rows))
    assert load_goodwiki(jsonl).articles == rows

    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(hf_rows), parquet)
    wiki = load_goodwiki(parquet)
    assert wiki.articles == rows
    assert wiki.provenance[0].sha256 == sha(parquet.read_bytes())

    pq.write_table(pa.Table.from_pylist([{"title": "A", "text": "b"}]), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match=r"bad\.parquet: missing column\(s\) markdown"):
        load_goodwiki(tmp_path / "bad.parquet")


def test_goodwiki_malformed_line(tmp_path):
    path = tmp_path / "goodwiki.jsonl"
    lines = (FIXTURES / "goodwiki.jsonl").read_text().splitlines()
    lines[2] = lines[2][:40]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError, match=rf"^{re.escape(str(path))}:3: not valid JSON"):
        load_goodwiki(path)
    path.write_text(json.dumps({"title": "No text"}) + "\n")
    with pytest.raises(SourceError, match=r":1: no document or markdown field"):
        load_goodwiki(path)


def test_goodwiki_from_the_hub_records_its_arrow_files(monkeypatch, tmp_path):
    import datasets

    rows = _goodwiki_rows()
    hf_rows = [
        {**{k: v for k, v in r.items() if k != "document"}, "markdown": r["document"]} for r in rows
    ]
    datasets.Dataset.from_list(hf_rows).save_to_disk(str(tmp_path / "hub"))
    stored = datasets.load_from_disk(str(tmp_path / "hub"))
    asked = []

    def fake_load(name, split=None, **kwargs):
        asked.append((name, split))
        return stored

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    wiki = load_goodwiki(None)
    assert asked == [("euirim/goodwiki", "train")]
    assert wiki.articles == rows
    arrow = [Path(f["filename"]) for f in stored.cache_files]
    assert arrow and [f.path for f in wiki.provenance] == [str(p) for p in arrow]
    assert [f.sha256 for f in wiki.provenance] == [sha(p.read_bytes()) for p in arrow]
    assert all(f.origin.startswith("hf:euirim/goodwiki@") for f in wiki.provenance)


def test_goodwiki_hub_failure_is_one_clear_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\n(offline mode)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError) as err:
        load_goodwiki(None)
    message = str(err.value)
    assert "euirim/goodwiki" in message and "--source goodwiki=PATH" in message
    assert "Couldn't reach the Hub (offline mode)" in message and "\n" not in message


# --------------------------------------------------------------------------- WikiRank and bins


def test_wikirank_matches_underscored_titles():
    rank = load_wikirank(FIXTURES / "wikirank")
    assert rank.lines == 5
    assert rank.scores["Harbour Lights Festival"] == 1450001.25
    assert "Harbour_Lights_Festival" not in rank.scores
    only = load_wikirank(FIXTURES / "wikirank", only=["Mount Orrin", "Elsbeth_Varga", "Nope"])
    assert only.scores == {"Mount Orrin": 1702000.0, "Elsbeth Varga": 1333333.375}
    assert [f.path for f in rank.provenance] == [
        str(FIXTURES / "wikirank" / "enwiki-2024.titles"),
        str(FIXTURES / "wikirank" / "enwiki-2024-h.txt"),
    ]


@pytest.mark.parametrize(("extra", "titles_n", "scores_n"), [("titles", 6, 5), ("scores", 5, 6)])
def test_wikirank_line_count_mismatch(tmp_path, extra, titles_n, scores_n):
    folder = tmp_path / "wikirank"
    shutil.copytree(FIXTURES / "wikirank", folder)
    name = "enwiki-2024.titles" if extra == "titles" else "enwiki-2024-h.txt"
    with open(folder / name, "a") as handle:
        handle.write("Extra_Line\n" if extra == "titles" else "1.0\n")
    with pytest.raises(SourceError) as err:
        load_wikirank(folder)
    message = str(err.value)
    assert f"{folder / 'enwiki-2024.titles'} has {titles_n} lines" in message
    assert f"{folder / 'enwiki-2024-h.txt'} has {scores_n}" in message


def test_wikirank_bad_score_and_upstream_filename(tmp_path):
    folder = tmp_path / "wikirank"
    folder.mkdir()
    (folder / "enwiki-2024.titles.txt").write_text("A\nB\n")  # upstream's saved name
    (folder / "enwiki-2024-h.txt").write_text("1.5\nn/a\n")
    with pytest.raises(SourceError, match=rf"{re.escape(str(folder))}/enwiki-2024-h.txt:2: "):
        load_wikirank(folder)
    (folder / "enwiki-2024-h.txt").write_text("1.5\n2.5\n")
    assert load_wikirank(folder).scores == {"A": 1.5, "B": 2.5}
    (folder / "enwiki-2024.titles.txt").write_text("Foo_Bar\nFoo Bar\n")
    assert load_wikirank(folder).scores == {"Foo Bar": 1.5}  # the first line wins
    (folder / "enwiki-2024-h.txt").unlink()
    with pytest.raises(SourceError, match=r"missing .*enwiki-2024-h\.txt"):
        load_wikirank(folder)


def test_bins_on_fixtures_report_missing_titles():
    titles = [a["title"] for a in load_goodwiki(FIXTURES / "goodwiki.jsonl").articles]
    rank = load_wikirank(FIXTURES / "wikirank", only=titles)
    bins = popularity_bins(titles, rank.scores, n_bins=3)
    assert bins.missing == ("The Copper Kettle (novel)",)
    assert bins.h_score_cat == {
        "Harbour Lights Festival": 1,
        "Mount Orrin": 2,
        "Elsbeth Varga": 0,
    }
    assert bins.edges[0] == 1333333.375 and bins.edges[-1] == 1702000.0
    with pytest.raises(SourceError, match="only 3 of 4 GoodWiki titles are in WikiRank"):
        popularity_bins(titles, rank.scores)


def test_bins_are_deciles_with_edges_recorded():
    rng = random.Random(3)
    scores = {f"Article {i}": rng.uniform(1e6, 3e6) for i in range(30)}
    titles = ["Absent One", *scores, "Absent Two"]
    bins = popularity_bins(titles, scores)
    ranked = sorted(scores, key=scores.get)
    assert bins.h_score_cat == {t: ranked.index(t) // 3 for t in scores}
    assert bins.counts() == [3] * 10
    values = np.array(list(scores.values()))
    assert bins.edges == tuple(np.quantile(values, np.linspace(0, 1, 11)).tolist())
    assert bins.edges[0] == min(scores.values()) and bins.edges[-1] == max(scores.values())
    manifest = bins.manifest()
    assert manifest["missing"] == ["Absent One", "Absent Two"] and manifest["missing_count"] == 2
    assert manifest["edges"] == list(bins.edges)
    assert "Absent One" not in bins.h_score_cat and "Absent One" not in bins.h_score
    json.dumps(manifest)  # plain floats and ints only


def test_bins_are_right_inclusive_like_upstream():
    scores = {"A": 1.0, "B": 2.0, "C": 2.0, "D": 2.0, "E": 3.0}  # the median edge is 2.0
    bins = popularity_bins(scores, scores, n_bins=2)
    assert bins.edges == (1.0, 2.0, 3.0)
    assert bins.h_score_cat == {"A": 0, "B": 0, "C": 0, "D": 0, "E": 1}


# --------------------------------------------------------------------------- ITIS


def _itis_tar_bytes(**replace_files: bytes) -> bytes:
    buffer = io.BytesIO()
    members = {
        "itisMySQL010125/taxonomic_units": b"1000|Animalia|other|columns\n",
        "itisMySQL010125/hierarchy": (FIXTURES / "itis" / "hierarchy").read_bytes(),
        "itisMySQL010125/longnames": (FIXTURES / "itis" / "longnames").read_bytes(),
        "itisMySQL010125/CreateDB.sql": b"CREATE TABLE hierarchy (...);\n",
    }
    for name, data in replace_files.items():
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _shape(itis) -> dict:
    return {
        tsn: (node.name, node.parent.tsn if node.parent else None, [c.tsn for c in node.children])
        for tsn, node in itis.nodes.items()
    }


def test_itis_directory():
    itis = load_itis(FIXTURES / "itis")
    assert [r.name for r in itis.roots] == ["Animalia", "Plantae", "Bacteria", "Fungi"]
    assert itis.nodes[1305].name == "Corvilla minuta" and itis.nodes[1305].parent.tsn == 1202
    assert itis.nodes[1205].name is None  # no longnames entry
    assert itis.nodes[2306].name == "Liliora naënsis"  # ISO-8859-1
    assert "Corvilla velox" in itis.names and 9001 not in itis.nodes  # longnames only
    assert [n.tsn for n in itis.leaves("Bacteria")] == [3301, 3302, 3303]
    assert itis.kingdom("Plantae").tsn == 2000
    with pytest.raises(SourceError, match="no kingdom 'Protozoa'"):
        itis.kingdom("Protozoa")


def test_itis_tar_gz_matches_directory(tmp_path):
    path = tmp_path / "itisMySQLTables.tar.gz"
    path.write_bytes(_itis_tar_bytes())
    from_tar, from_dir = load_itis(path), load_itis(FIXTURES / "itis")
    assert _shape(from_tar) == _shape(from_dir)
    assert from_tar.names == from_dir.names
    assert [f.sha256 for f in from_tar.provenance] == [sha(path.read_bytes())]


def test_itis_malformed_lines(tmp_path):
    lines = (FIXTURES / "itis" / "hierarchy").read_bytes().splitlines(keepends=True)
    lines[3] = b"1000-1100-x1110|1110|1100|2|1\n"
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(_itis_tar_bytes(**{"itisMySQL010125/hierarchy": b"".join(lines)}))
    with pytest.raises(SourceError) as err:
        load_itis(path)
    assert str(err.value).startswith(f"{path}[itisMySQL010125/hierarchy]:4: column 1")

    folder = tmp_path / "itis"
    shutil.copytree(FIXTURES / "itis", folder)
    with open(folder / "longnames", "ab") as handle:
        handle.write(b"1234 no separator\n")
    count = len((folder / "longnames").read_bytes().splitlines())
    with pytest.raises(SourceError, match=rf"longnames:{count}: expected TSN\|name"):
        load_itis(folder)


def test_itis_archive_without_longnames(tmp_path):
    path = tmp_path / "partial.tar.gz"
    path.write_bytes(_itis_tar_bytes(**{"itisMySQL010125/longnames": None}))
    with pytest.raises(SourceError, match="no longnames file"):
        load_itis(path)
    path.write_bytes(b"not a tar")
    with pytest.raises(SourceError, match=r"not a readable \.tar\.gz"):
        load_itis(path)


# --------------------------------------------------------------------------- medicines


EXPECTED_NAME_COLUMN = [
    "Zorvex 500mg Tablet",
    "Neuvira Plus Capsule",
    "Dermalin Cream (Strong)",
    "Paxora & Co Tablet",
    "Fluvane, Extra Gel",
    "Brivonex 10ml Syrup",
    "Oxelin 250 Capsule",
    "Tarvix Kid Drops",
    "Pelvane",
    "Ravolin Suspension",
]


def test_medicines_csv_and_zip(tmp_path):
    csv_path = FIXTURES / "medicine_dataset.csv"
    meds = load_medicines(csv_path)
    assert meds.rows == 10
    assert meds.columns["name"] == EXPECTED_NAME_COLUMN
    assert meds.columns["substitute1"] == ["Fenrix Tablet", "Velnox Duo Syrup", "Calmora Syrup"]
    assert meds.columns["substitute4"] == []
    assert meds.names()[:10] == EXPECTED_NAME_COLUMN and meds.names()[10] == "Calmora Syrup"

    zipped = tmp_path / "250k-medicines.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("README.txt", "not data")
        archive.write(csv_path, "medicine_dataset.csv")
    from_zip = load_medicines(zipped)
    assert from_zip.columns == meds.columns
    assert from_zip.provenance[0].sha256 == sha(zipped.read_bytes())


def test_medicines_malformed(tmp_path):
    lines = (FIXTURES / "medicine_dataset.csv").read_text().splitlines()
    bad = tmp_path / "medicine_dataset.csv"
    bad.write_text("\n".join([*lines[:3], lines[3] + ",extra,fields,here", *lines[4:]]) + "\n")
    with pytest.raises(
        SourceError, match=rf"^{re.escape(str(bad))}:4: 17 fields, the header has 14"
    ):
        load_medicines(bad)
    bad.write_text(lines[0].replace(",substitute4", "") + "\n" + "1,x,y,z,,,,a\n")
    with pytest.raises(SourceError, match=r":1: missing column\(s\) substitute4"):
        load_medicines(bad)
