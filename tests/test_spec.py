"""Capture options: parsing, resolution against the model depth, and errors."""

import pytest

from hallulens_capture.errors import CaptureConfigError
from hallulens_capture.spec import ENV_STORE_PATH, CaptureSpec


def spec(**kwargs):
    return CaptureSpec.from_model_args(activations="/tmp/x", environ={}, **kwargs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", list(range(31))),
        (None, list(range(31))),
        ("0,8,16", [0, 8, 16]),
        ("16;8;0", [0, 8, 16]),  # `;` survives lm-eval's comma splitting of model_args
        ([0, 8, 16], [0, 8, 16]),  # lm-eval's CLI turns `[0,8,16]` into a list
        ("10-20", list(range(10, 21))),
        ("10:12", [10, 11, 12]),
        (-1, [30]),
        (-1.0, [30]),  # lm-eval's CLI turns `-1` into a float
        ("-4--1", [27, 28, 29, 30]),
        ("0, -1", [0, 30]),
        (5, [5]),
    ],
)
def test_layers_resolve(value, expected):
    assert list(spec(capture_layers=value).layer_ids(30)) == expected


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"capture_layers": "31"}, "layer 31 is out of range"),
        ({"capture_layers": "-32"}, "layer -32 is out of range"),
        ({"capture_layers": "x"}, "'x' is not a layer id or range"),
        ({"capture_layers": "3-x"}, "'3-x' is not a layer id or range"),
        ({"capture_layers": "20-10"}, "range 20-10 is empty"),
        ({"capture_layers": 1.5}, "layer ids are integers"),
        ({"capture_layers": ""}, "capture_layers is empty"),
        ({"capture_tokens": "generation"}, "capture_tokens='generation'"),
        ({"capture_dtype": "int8"}, "capture_dtype='int8'"),
        ({"map_size_gb": 0}, "map_size_gb=0"),
        ({"map_size_gb": "big"}, "map_size_gb='big'"),
        ({"map_size_gb": "1e9"}, "map_size_gb='1e9' must be at most 131072"),
    ],
)
def test_bad_options_name_the_problem(kwargs, fragment):
    with pytest.raises(CaptureConfigError) as info:
        spec(**kwargs).layer_ids(30)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_capture_off_without_path_and_on_with_env():
    assert CaptureSpec.from_model_args(environ={}) is None
    on = CaptureSpec.from_model_args(environ={ENV_STORE_PATH: "/tmp/seed.lmdb"})
    assert on is not None and on.path == "/tmp/seed.lmdb"
    assert (on.tokens, on.dtype, on.map_size_gb) == ("generated", "float16", 16.0)


def test_capture_options_without_a_path_are_refused():
    with pytest.raises(CaptureConfigError, match="capture_layers given but capture is off"):
        CaptureSpec.from_model_args(capture_layers="0", environ={})


@pytest.mark.parametrize(
    ("scope", "expected"),
    [  # a 4-token prompt and 3 generated tokens: positions 0..5 are fed, 6 (the last) is not
        ("prompt", [0, 1, 2, 3]),
        ("generated", [4, 5]),
        ("all", [0, 1, 2, 3, 4, 5]),
        ("response", [3, 4, 5]),  # one state per generated token: the one that produced it
    ],
)
def test_token_positions_of_each_scope(scope, expected):
    from hallulens_capture.positions import token_positions

    assert token_positions(scope, 4, 3).tolist() == expected
