"""The record format: plain safetensors, zero-copy views, slices, bfloat16, corrupt values."""

import json
import struct

import crafted
import numpy as np
import pytest
import torch
from safetensors.numpy import load as safetensors_load

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.record import Record, TokenParts, encode_record
from hallulens_capture.report import check_record

METADATA = {
    "prompt": "p",
    "response": "r",
    "model": "m",
    "capture_tokens": "all",
    "dtype": "float16",
}


def make(acts, label="F16", layer_ids=(0, 3, 7)):
    n_tokens = acts.shape[1]
    index = {
        "layer_ids": list(layer_ids),
        "token_positions": list(range(n_tokens)),
        "prompt_token_ids": [5] * (n_tokens - 2),
        "generated_token_ids": [6, 7, 8],
    }
    return encode_record(acts, label, index, METADATA)


def test_record_is_plain_safetensors():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((3, 5, 8)).astype(np.float16)
    buf = make(acts)
    tensors = safetensors_load(bytes(buf))  # the reference implementation reads it
    np.testing.assert_array_equal(tensors["all_layers_activations"], acts)
    np.testing.assert_array_equal(tensors["layer_ids"], [0, 3, 7])
    (hlen,) = struct.unpack("<Q", bytes(buf[:8]))
    assert json.loads(bytes(buf[8 : 8 + hlen]))["__metadata__"]["prompt"] == "p"
    assert (8 + hlen) % 8 == 0  # activations start 8-byte aligned


def test_views_are_zero_copy_and_slices_copy_only_the_selection():
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((3, 6, 4)).astype(np.float32)
    buf = make(acts, "F32")
    record = Record("k", buf)
    full = record.all_layers_activations
    assert np.shares_memory(full, np.frombuffer(buf, dtype=np.uint8))
    np.testing.assert_array_equal(record.activations, acts[-1])
    part = record.slice(layers=[7, 0], tokens=slice(1, 4))
    np.testing.assert_array_equal(part, acts[[2, 0], 1:4])
    assert not np.shares_memory(part, full)
    np.testing.assert_array_equal(record.slice(layers=3, tokens=[0, 5]), acts[[1]][:, [0, 5]])
    with pytest.raises(KeyError, match=r"no layer\(s\) \[4\]"):
        record.slice(layers=[4])


def test_bfloat16_is_stored_as_bits_and_read_as_float32():
    values = torch.randn(2, 3, 4).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    record = Record("k", make(bits, "BF16", layer_ids=(1, 2)))
    np.testing.assert_array_equal(record.all_layers_activations, values.float().numpy())
    np.testing.assert_array_equal(record.slice(layers=[2])[0], values[1].float().numpy())


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda b: b[:4], "too short"),
        (lambda b: struct.pack("<Q", 10**9) + bytes(b[8:]), "header length"),
        (lambda b: bytes(b[:8]) + b"x" + bytes(b[9:]), "not JSON"),
        (lambda b: bytes(b[:-16]), "do not fit shape"),
    ],
)
def test_damaged_values_are_reported(damage, fragment):
    buf = make(np.zeros((3, 5, 8), dtype=np.float16))
    with pytest.raises(RecordFormatError, match=fragment):
        Record("k", damage(buf))


@pytest.mark.parametrize("name", sorted(crafted.CRAFTED))
def test_crafted_records_are_refused_with_one_line(name):
    """Each of these once raised RecursionError, TypeError, OverflowError or AttributeError in a
    reader, or parsed and then showed 4.6e18 or -3 tokens."""
    value, fragment = crafted.CRAFTED[name]
    with pytest.raises(RecordFormatError) as info:
        Record("k", value)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("record k: ")


def test_a_hand_built_record_without_checksum_still_reads():
    """Records written before checksums (built here by hand from the documented layout) read as
    before and have nothing to check against."""
    tensors = crafted.arrays(layers=3, tokens=2, hidden=5, fill=1.5)
    buf = crafted.valid(prompt="old", layers=3, tokens=2, hidden=5, fill=1.5)
    record = Record(crafted.key_of("old"), buf)
    np.testing.assert_array_equal(record.all_layers_activations, tensors["all_layers_activations"])
    assert record.checksum is None
    assert check_record(record) == []


def test_records_written_with_crc32_still_verify():
    """Records of the previous writer carry CRC-32; they are checked with it."""
    buf = crafted.valid(prompt="crc", checksum="crc32", layers=2, tokens=3, hidden=4, fill=0.5)
    record = Record(crafted.key_of("crc"), buf)
    assert record.checksum.startswith("crc32:") and record.data_checksum() == record.checksum
    assert check_record(record) == []
    damaged = bytearray(buf)
    damaged[-30] ^= 0x01
    problems = check_record(Record(record.key, damaged))
    assert len(problems) == 1 and "do not match the record's checksum crc32:" in problems[0]
    unknown = crafted.edited(crafted.set_path(("__metadata__", "checksum"), "md5:00"))
    problems = check_record(Record(crafted.key_of("crafted prompt"), unknown))
    assert problems == ["checksum 'md5:00': unknown checksum kind 'md5'"]


def test_the_checksum_is_xxh3_of_the_tensor_bytes_and_safetensors_still_reads_it():
    tensors = crafted.arrays(layers=2, tokens=3, hidden=4, fill=0.25)
    index = {name: tensors[name] for name in list(tensors)[1:]}
    meta = crafted.header(tensors)["__metadata__"]
    buf = bytes(encode_record(tensors["all_layers_activations"], "F16", index, meta))
    expected = crafted.header(tensors, checksum="xxh3")["__metadata__"]["checksum"]
    record = Record(crafted.key_of("crafted prompt"), buf)
    assert record.checksum == expected == record.data_checksum()
    assert check_record(record) == []
    loaded = safetensors_load(buf)
    np.testing.assert_array_equal(
        loaded["all_layers_activations"], tensors["all_layers_activations"]
    )
    damaged = bytearray(buf)
    damaged[-60] ^= 0x40  # a bit of the activations, after the header
    problems = check_record(Record(record.key, damaged))
    assert len(problems) == 1 and "do not match the record's checksum" in problems[0]
    assert check_record(Record(record.key, damaged), read_values=False) == []


def test_rows_of_a_larger_file_are_encoded_from_the_view_itself():
    """vLLM's hand-over file holds [layers, capacity, hidden]; the record gets rows at..at+n of
    each layer from a strided view of it, copied once into a scratch buffer that then holds a
    record equal, byte for byte, to the one encoded from a contiguous copy."""
    tensors = crafted.arrays(layers=3, tokens=5, hidden=4, fill=0.5)
    index = {name: tensors[name] for name in list(tensors)[1:]}
    meta = crafted.header(tensors)["__metadata__"]
    rows = tensors["all_layers_activations"]
    larger = np.full((3, 9, 4), np.float16(7.0))
    larger[:, 2:7] = rows
    view = larger[:, 2:7]
    assert not view.flags.c_contiguous
    scratch = bytearray(1 << 16)  # larger than the record, with stale bytes after it
    scratch[:] = b"\xff" * len(scratch)
    encoded = encode_record(view, "F16", index, meta, scratch)
    assert encoded.obj is scratch
    assert bytes(encoded) == bytes(encode_record(np.ascontiguousarray(view), "F16", index, meta))
    record = Record(crafted.key_of("crafted prompt"), bytes(encoded))
    np.testing.assert_array_equal(record.all_layers_activations, rows)
    assert record.checksum == record.data_checksum() and check_record(record) == []


def test_a_record_from_token_parts_equals_the_one_from_their_concatenation():
    """A backend hands a request's forward steps over as TokenParts (strided views of per-step
    blocks [layers, batch, tokens, hidden]); the encoder joins them into the record."""
    tensors = crafted.arrays(layers=3, tokens=5, hidden=4, fill=0.5)
    index = {name: tensors[name] for name in list(tensors)[1:]}
    meta = crafted.header(tensors)["__metadata__"]
    rng = np.random.default_rng(3)
    steps = [rng.standard_normal((3, 2, n, 4)).astype(np.float16) for n in (2, 1, 1, 1)]
    parts = [step[:, 1] for step in steps]  # batch row 1 of each step
    assert not any(part.flags.c_contiguous for part in parts)
    joined = np.concatenate([np.ascontiguousarray(p) for p in parts], axis=1)
    scratch = bytearray(b"\xff" * (1 << 16))
    encoded = encode_record(TokenParts(parts), "F16", index, meta, scratch)
    assert bytes(encoded) == bytes(encode_record(joined, "F16", index, meta))
    record = Record(crafted.key_of("crafted prompt"), bytes(encoded))
    np.testing.assert_array_equal(record.all_layers_activations, joined)
    assert record.checksum == record.data_checksum() and check_record(record) == []
    with pytest.raises(ValueError, match="does not extend one of"):
        TokenParts([parts[0], steps[1][:2, 1]])  # two layers instead of three
    with pytest.raises(ValueError, match="does not extend one of"):
        TokenParts([parts[0], parts[1].astype(np.float32)])


def test_bad_gen_kwargs_are_a_problem_not_a_traceback():
    for text in ("{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000):
        buf = crafted.edited(crafted.set_path(("__metadata__", "gen_kwargs"), text))
        record = Record(crafted.key_of("crafted prompt"), buf)
        with pytest.raises(RecordFormatError, match="is not a JSON object"):
            record.gen_kwargs  # noqa: B018
        assert [p for p in check_record(record) if "gen_kwargs" in p]


def test_a_key_that_is_not_utf8_is_refused():
    key = b"\xff\xfe-not-utf8".decode("utf-8", "surrogateescape")
    with pytest.raises(RecordFormatError, match=r"record b'\\xff\\xfe-not-utf8': key is not UTF-8"):
        Record(key, crafted.valid())
