"""`hallulens activations ls|show|stats|verify` and `hallulens models path` on real stores."""

import json

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
