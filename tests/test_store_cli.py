"""`hallulens activations ls|show|stats|verify` and `hallulens models path` on real stores."""

import json
import struct
import subprocess

import crafted
import numpy as np
from conftest import BIN, run_cli
from store_worker import sample

from hallulens_capture.store import ActivationStore
from hallulens_tasks.cli import main


def filled(tmp_path, n=3):
    path = tmp_path / "s.lmdb"
    with ActivationStore(path, writable=True) as store:
        for i in range(n):
            store.put(*sample(i))
    return str(path)


def test_ls_show_stats(tmp_path, capsys):
    path = filled(tmp_path)
    assert main(["activations", "ls", path]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == sorted(sample(i)[0] for i in range(3))
    assert main(["activations", "show", sample(2)[0], path]) == 0
    out = capsys.readouterr().out
    assert (
        "'prompt number 2'" in out and "shape [2, 48, 1024]" in out and out.rstrip().endswith("ok")
    )
    assert main(["activations", "stats", path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 3 and stats["tokens"] == 3 * 48 and stats["layers"] == {"0-1 (2)": 3}


def test_verify_flags_a_bad_record_and_unknown_keys_are_one_line(tmp_path, capsys):
    path = filled(tmp_path, 2)
    key, value = sample(7)
    with ActivationStore(path, writable=True) as store:
        store.put("0" * 64, value)  # a record under a key that is not its prompt's hash
    assert main(["activations", "verify", path]) == 1
    out = capsys.readouterr().out
    assert f"BAD {'0' * 64}: key is not sha256 of the stored prompt" in out
    assert "2 of 3 records ok" in out
    assert main(["activations", "show", key, path]) == 1
    assert capsys.readouterr().err.strip() == f"hallulens: error: no record {key} in {path}"
    assert main(["activations", "stats", str(tmp_path / "nothing")]) == 1
    assert "no activation store at" in capsys.readouterr().err


def test_models_path(smollm2_dir, capsys):
    assert main(["models", "path", "smollm2", "--format", "hf"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["models", "path", "smollm2", "--format", "gguf"]) == 0
    assert capsys.readouterr().out.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def one_error_line(result) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout[-1000:], result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hallulens: error: "), result.stderr
    return lines[0]


def hostile_store(tmp_path) -> tuple[str, dict[str, str]]:
    """A store with two good records and every crafted one (shown key -> expected problem)."""
    import lmdb

    path = filled(tmp_path, 2)
    expected = {}
    with ActivationStore(path, writable=True) as store:
        for name, (value, fragment) in crafted.CRAFTED.items():
            store.put(f"crafted-{name}", value)
            expected[f"crafted-{name}"] = fragment
        bad_json = crafted.edited(crafted.set_path(("__metadata__", "gen_kwargs"), "{oops"), "gen")
        store.put(crafted.key_of("gen"), bad_json)
        expected[crafted.key_of("gen")] = "gen_kwargs '{oops' is not a JSON object"
    env = lmdb.open(path, max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"\xff" * 8, crafted.valid(), db=env.open_db(b"records", txn=txn))
    env.close()
    expected[r"b'\xff\xff\xff\xff\xff\xff\xff\xff'"] = "key is not UTF-8"
    return path, expected


def test_crafted_records_are_bad_lines_in_verify_and_one_line_refusals_elsewhere(tmp_path):
    path, expected = hostile_store(tmp_path)
    result = run_cli("hallulens", "activations", "verify", path, timeout=120)
    assert result.returncode == 1 and result.stderr == "", result.stderr[-3000:]
    bad = dict(
        line[4:].split(": ", 1) for line in result.stdout.splitlines() if line.startswith("BAD ")
    )
    assert sorted(bad) == sorted(expected)
    for key, fragment in expected.items():
        assert fragment in bad[key], (key, bad[key])
    assert f"2 of {len(expected) + 2} records ok" in result.stdout
    for command in ("ls", "stats"):
        line = one_error_line(run_cli("hallulens", "activations", command, path))
        assert f"`hallulens activations verify {path}` lists every bad record" in line
    for key in expected:
        if key.startswith("b'"):
            continue  # the undecodable key: next test
        line = one_error_line(run_cli("hallulens", "activations", "show", key, path))
        assert line.startswith(f"hallulens: error: record {key}: {expected[key]}"[:40])


def test_odd_arguments_are_one_line(tmp_path):
    path = filled(tmp_path, 1)
    bin_ = str(BIN / "hallulens")
    key = b"\xff\xfe"  # not UTF-8: Python hands it over as surrogates
    result = subprocess.run(
        [bin_, "activations", "show", key, path.encode()], capture_output=True, timeout=60
    )
    assert result.returncode == 1 and result.stderr.decode().strip() == (
        rf"hallulens: error: no record b'\xff\xfe' in {path}"
    )
    line = one_error_line(run_cli("hallulens", "activations", "show", "", path))
    assert line == f"hallulens: error: no record b'' in {path}"
    line = one_error_line(run_cli("hallulens", "activations", "ls", path, "--limit", "-1"))
    assert line == "hallulens: error: --limit=-1 must be at least 0"


def test_stats_says_when_a_store_mixes_kinds_of_record(tmp_path, capsys):
    path = filled(tmp_path, 2)
    with ActivationStore(path, writable=True) as store:
        store.put(
            crafted.key_of("crafted prompt"), crafted.valid()
        )  # model m, backend test, 2 layers
        store.put(crafted.key_of("other"), other_kind())
    result = run_cli("hallulens", "activations", "stats", path)
    assert result.returncode == 0, result.stderr
    mixed = [line for line in result.stdout.splitlines() if line.startswith("mixed")]
    assert mixed == [
        "mixed        : 2 models, 2 backends, 2 capture_tokens, 2 layers: records made with "
        "different settings; analyse one kind at a time"
    ]
    assert main(["activations", "stats", path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["mixed"] == {"models": 2, "backends": 2, "capture_tokens": 2, "layers": 2}
    assert stats["records"] == 4 and stats["tokens"] == 2 * 48 + 3 + 3
    single = filled(tmp_path / "one", 2)
    assert main(["activations", "stats", single, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mixed"] == {}


def other_kind() -> bytes:
    """A record of another model and backend, capture_tokens=all (3 positions for 3 prompt + 1
    generated token) and layers 5 and 9."""
    tensors = crafted.arrays()
    tensors["layer_ids"] = np.array([5, 9], dtype=np.int32)
    head = crafted.header(tensors, "other")
    head["__metadata__"].update(model="m2", backend="hf", capture_tokens="all")
    return crafted.value(head, b"".join(a.tobytes() for a in tensors.values()))


def test_verify_reports_records_without_checksum_and_catches_overwritten_bytes(tmp_path):
    path = tmp_path / "s.lmdb"
    with ActivationStore(path, writable=True) as store:
        store.put(crafted.key_of("old"), crafted.valid(prompt="old"))  # no checksum, as before
        store.put(*sample(3))  # checksum written by the encoder; activations all 3.0 (0x4200)
    result = run_cli("hallulens", "activations", "verify", str(path))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "2 of 2 records ok",
        "1 records have no checksum (written before checksums were added): their bytes were "
        "not checked against one",
    ]
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    run = bytes.fromhex("0042") * 64
    at = raw.find(run)
    assert at > 0 and raw.count(run) > 100
    raw[at : at + 8] = bytes.fromhex("00bc") * 4  # four of the values now read -1.0
    data.write_bytes(raw)
    result = run_cli("hallulens", "activations", "verify", str(path))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"BAD {sample(3)[0]}: stored bytes do not match the record's checksum "
        f"{json_checksum(bytes(sample(3)[1]))} (overwritten or damaged after writing)"
    )
    headers_only = run_cli("hallulens", "activations", "verify", str(path), "--headers-only")
    assert headers_only.returncode == 0 and headers_only.stdout.strip() == "2 of 2 records ok"


def json_checksum(value: bytes) -> str:
    (hlen,) = struct.unpack_from("<Q", value)
    return json.loads(value[8 : 8 + hlen])["__metadata__"]["checksum"]
