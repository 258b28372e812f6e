"""The record format: plain safetensors, zero-copy views, slices, bfloat16, corrupt values."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load as safetensors_load

from hallulens_capture.errors import RecordFormatError
from hallulens_capture.record import Record, encode_record

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
