"""Loading --data / --eval-data: npz arrays, image folders and MODULE:FUNCTION sources."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.data import IMAGENET_MEAN, IMAGENET_STD, Dataset, load_data
from compressor.errors import CompressorError, DataError

SHAPE = (1, 3, 8, 8)


def _npz(tmp_path: Path, name: str = "data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _uint8(n: int = 10, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _floats(n: int = 10, c: int = 3, h: int = 8, w: int = 8, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype)


def _all(dataset: Dataset, batch_size: int = 4, limit: int | None = None):
    batches = list(dataset.batches(batch_size, limit))
    x = torch.cat([b[0] for b in batches])
    y = None if batches[0][1] is None else torch.cat([b[1] for b in batches])
    return batches, x, y


def _png(path: Path, size=(12, 10), color=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _module(tmp_path: Path, monkeypatch, body: str) -> str:
    """Write ``body`` as a fresh module in ``tmp_path``, put it on sys.path and return its name."""
    name = f"data_src_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import numpy as np\nimport torch\n\n" + textwrap.dedent(body)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _one_line_error(excinfo, *words: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, DataError) and isinstance(excinfo.value, CompressorError)
    assert excinfo.value.exit_code == 2
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------------------------------
# npz


def test_npz_segmentation_masks_load_as_labels(tmp_path):
    # y (N, H, W): one class per pixel, 255 where unlabelled; shuffled views keep masks with their images.
    masks = np.random.default_rng(0).integers(0, 4, size=(10, 8, 8)).astype(np.uint8)
    masks[:, 0] = 255
    data = load_data(_npz(tmp_path, x=_floats(), y=masks), input_shape=SHAPE)
    assert data.labeled, data
    _, inputs, labels = _all(data.shuffled(3), batch_size=4)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (10, 8, 8), (labels.dtype, labels.shape)
    order = [int(np.flatnonzero((_floats() == row.numpy()).all(axis=(1, 2, 3)))[0]) for row in inputs]
    assert labels.tolist() == masks[order].astype(np.int64).tolist()


@pytest.mark.parametrize(
    "x, with_y",
    [
        (_uint8(), False),
        (_uint8(), True),
        (_floats(), False),
        (_floats(dtype=np.float64), True),
    ],
    ids=["uint8", "uint8+y", "float32", "float64+y"],
)
def test_npz_loads_and_batches(tmp_path, x, with_y):
    y = np.arange(10, dtype=np.int32) % 3
    path = _npz(tmp_path, x=x, **({"y": y} if with_y else {}))
    data = load_data(path, input_shape=SHAPE)
    assert (data.source, data.kind, data.shape, data.labeled, len(data)) == (path, "npz", (3, 8, 8), with_y, 10)
    batches, inputs, labels = _all(data, batch_size=4)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert inputs.dtype == torch.float32 and inputs.shape == (10, 3, 8, 8)
    if with_y:
        assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    else:
        assert labels is None
    if x.dtype == np.uint8:
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
        np.testing.assert_allclose(inputs.numpy(), (x / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(inputs.numpy(), x.astype(np.float32))  # floats are never normalized


@pytest.mark.parametrize(
    "channels, mean, std, expected_mean, expected_std",
    [
        (1, None, None, [0.0], [1.0]),
        (2, None, None, [0.0, 0.0], [1.0, 1.0]),
        (3, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0], [0.5, 0.5, 0.5], [0.25, 0.5, 1.0]),
        (1, [0.5], None, [0.5], [1.0]),
        (3, None, [2.0, 2.0, 2.0], list(IMAGENET_MEAN), [2.0, 2.0, 2.0]),
    ],
)
def test_uint8_normalization(tmp_path, channels, mean, std, expected_mean, expected_std):
    x = _uint8(n=3, c=channels)
    data = load_data(_npz(tmp_path, x=x), input_shape=(1, channels, 8, 8), mean=mean, std=std)
    _, inputs, _ = _all(data)
    m = np.asarray(expected_mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(expected_std, dtype=np.float32).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(inputs.numpy(), (x / 255.0 - m) / s, rtol=1e-5, atol=1e-5)


def test_uint8_single_pixel_values(tmp_path):
    x = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    x[0, 0, 0, 0] = 255
    data = load_data(_npz(tmp_path, x=x), input_shape=(1, 1, 8, 8), mean=[0.5], std=[0.25])
    inputs = next(data.batches(1))[0]
    assert inputs[0, 0, 0, 0].item() == pytest.approx(2.0)  # (1 - 0.5) / 0.25
    assert inputs[0, 0, 0, 1].item() == pytest.approx(-2.0)  # (0 - 0.5) / 0.25


def test_float_arrays_ignore_normalization(tmp_path):
    x = _floats(n=2)
    data = load_data(_npz(tmp_path, x=x), input_shape=SHAPE, mean=[9, 9, 9], std=[9, 9, 9])
    np.testing.assert_array_equal(_all(data)[1].numpy(), x)


@pytest.mark.parametrize(
    "batch_size, limit, sizes",
    [
        (4, None, [4, 4, 2]),
        (4, 7, [4, 3]),
        (3, 6, [3, 3]),
        (20, None, [10]),
        (4, 0, []),
        (1, 2, [1, 1]),
        (4, 50, [4, 4, 2]),
    ],
)
def test_limit_and_batch_size(tmp_path, batch_size, limit, sizes):
    x = _floats()
    data = load_data(_npz(tmp_path, x=x), input_shape=SHAPE)
    batches = list(data.batches(batch_size, limit))
    assert [b[0].shape[0] for b in batches] == sizes
    assert data.count(limit) == sum(sizes)
    if sizes:
        np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), x[: sum(sizes)])


def test_repeated_iteration_is_identical(tmp_path):
    data = load_data(_npz(tmp_path, x=_uint8(), y=np.arange(10)), input_shape=SHAPE)
    first, second = list(data.batches(3)), list(data.batches(3))
    assert len(first) == len(second) == 4
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    first[0][0].zero_()  # batches are copies: changing one does not change the next pass
    assert not torch.equal(next(data.batches(3))[0], first[0][0])


@pytest.mark.parametrize("holdout, expected", [(3, 3), (0.25, 2), (0.01, 1), (0.99, 9)])
def test_split_is_deterministic_and_disjoint(tmp_path, holdout, expected):
    y = np.arange(10)
    data = load_data(_npz(tmp_path, x=_floats(), y=y), input_shape=SHAPE)
    rest, held = data.split(holdout, seed=1)
    assert (len(rest), len(held)) == (10 - expected, expected)
    rest_labels, held_labels = _all(rest)[2].tolist(), _all(held)[2].tolist()
    assert not set(rest_labels) & set(held_labels)
    assert sorted(rest_labels + held_labels) == list(range(10))
    again_rest, again_held = data.split(holdout, seed=1)
    assert _all(again_rest)[2].tolist() == rest_labels and _all(again_held)[2].tolist() == held_labels
    # samples stay paired with their labels
    x_rest, y_rest = _all(rest)[1:]
    np.testing.assert_array_equal(x_rest.numpy(), _floats()[y_rest.numpy()])
    assert (rest.kind, rest.source, rest.labeled) == (data.kind, data.source, True)


def test_split_seed_changes_order_and_shuffled_is_a_permutation(tmp_path):
    data = load_data(_npz(tmp_path, x=_floats(n=50), y=np.arange(50)), input_shape=SHAPE)
    assert _all(data.split(10, seed=0)[1])[2].tolist() != _all(data.split(10, seed=1)[1])[2].tolist()
    shuffled = _all(data.shuffled(seed=3))[2].tolist()
    assert sorted(shuffled) == list(range(50)) and shuffled != list(range(50))
    assert shuffled == _all(data.shuffled(seed=3))[2].tolist()


@pytest.mark.parametrize(
    "holdout, words", [(0, ["0 of 10", "1 to 9"]), (10, ["10 of 10"]), (1.0, ["(0, 1)"]), (0.0, ["(0, 1)"])]
)
def test_split_rejects_bad_holdout(tmp_path, holdout, words):
    path = _npz(tmp_path, x=_floats())
    with pytest.raises(DataError) as excinfo:
        load_data(path, input_shape=SHAPE).split(holdout)
    _one_line_error(excinfo, path, *words)


def test_split_needs_two_samples(tmp_path):
    path = _npz(tmp_path, x=_floats(n=1))
    with pytest.raises(DataError) as excinfo:
        load_data(path, input_shape=SHAPE).split(0.5)
    _one_line_error(excinfo, path, "at least 2")


def test_batches_rejects_bad_arguments(tmp_path):
    data = load_data(_npz(tmp_path, x=_floats()), input_shape=SHAPE)
    with pytest.raises(ValueError):
        list(data.batches(0))
    with pytest.raises(ValueError):
        list(data.batches(2, limit=-1))


# ----------------------------------------------------------------------------------------------------------------------
# image folders


def test_image_folder_with_classes(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "zebra" / "a.png", color=(0, 0, 255))
    _png(root / "apple" / "b.PNG", color=(255, 0, 0))
    _png(root / "apple" / "nested" / "c.jpg", color=(255, 0, 0))
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    data = load_data(str(root), input_shape=SHAPE)
    assert (data.kind, data.labeled, data.classes, len(data)) == ("images", True, ["apple", "empty_class", "zebra"], 3)
    _, x, y = _all(data, batch_size=2)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 2]  # sorted class names; the empty class keeps its index
    red = (np.array([1.0, 0.0, 0.0]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 4, 4].numpy(), red, rtol=1e-5)
    blue = (np.array([0.0, 0.0, 1.0]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[2].mean(dim=(1, 2)).numpy(), blue, rtol=1e-5)


@pytest.mark.parametrize("size", [(12, 10), (10, 12), (8, 8), (4, 6), (40, 9)])
def test_image_resize_and_center_crop(tmp_path, size):
    _png(tmp_path / "imgs" / "c" / "a.png", size=size)
    data = load_data(str(tmp_path / "imgs"), input_shape=SHAPE)
    assert next(data.batches(4))[0].shape == (1, 3, 8, 8)
    data = load_data(str(tmp_path / "imgs"), input_shape=(1, 3, 6, 9))
    assert next(data.batches(4))[0].shape == (1, 3, 6, 9)


def test_image_center_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (24, 8), (0, 0, 0))
    for x in range(8, 16):
        for y in range(8):
            image.putpixel((x, y), (255, 255, 255))
    (tmp_path / "imgs").mkdir()
    image.save(tmp_path / "imgs" / "bar.png")
    data = load_data(str(tmp_path / "imgs"), input_shape=(1, 1, 8, 8), mean=[0.0], std=[1.0])
    x = next(data.batches(1))[0]
    assert x.shape == (1, 1, 8, 8) and x.min().item() == pytest.approx(1.0)  # only the white middle is kept


def test_flat_folder_is_unlabeled_and_grayscale(tmp_path):
    for name in ("b.png", "a.bmp", "c.TIFF", "d.gif", "e.webp", "f.jpeg"):
        _png(tmp_path / "flat" / name, color=(128, 128, 128))
    data = load_data(str(tmp_path / "flat"), input_shape=(1, 1, 8, 8))
    assert (data.labeled, data.classes, len(data)) == (False, None, 6)
    batches, x, y = _all(data, batch_size=4)
    assert y is None and [b[0].shape for b in batches] == [(4, 1, 8, 8), (2, 1, 8, 8)]
    assert all(b[1] is None for b in batches)
    np.testing.assert_allclose(x[:, :, 2:6, 2:6].numpy(), 128 / 255, atol=2 / 255)  # mean 0, std 1 for 1 channel


def test_unreadable_image_names_the_file(tmp_path):
    _png(tmp_path / "imgs" / "c" / "good.png")
    (tmp_path / "imgs" / "c" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    data = load_data(str(tmp_path / "imgs"), input_shape=SHAPE)  # files are decoded lazily
    with pytest.raises(DataError) as excinfo:
        list(data.batches(4))
    _one_line_error(excinfo, str(tmp_path / "imgs"), "broken.jpg", "cannot decode", "expected")


@pytest.mark.parametrize(
    "layout, shape, words",
    [
        ("empty", SHAPE, ["no images found", ".jpg", ".png", ".tiff", "expected", "found 0"]),
        ("text_only", SHAPE, ["no images found", ".webp", "found 2"]),
        ("empty_classes", SHAPE, ["no images found"]),
        ("mixed", SHAPE, ["1 image(s) directly", "1 in class sub-folders", "not both"]),
        ("flat", (1, 4, 8, 8), ["4 channels", "1-channel", "3-channel"]),
    ],
)
def test_image_folder_errors(tmp_path, layout, shape, words):
    root = tmp_path / "imgs"
    root.mkdir()
    if layout == "text_only":
        (root / "a.txt").write_text("x")
        (root / "b.csv").write_text("x")
    elif layout == "empty_classes":
        (root / "cat").mkdir()
        (root / "dog").mkdir()
    elif layout == "mixed":
        _png(root / "top.png")
        _png(root / "cls" / "inner.png")
    elif layout == "flat":
        _png(root / "top.png")
    with pytest.raises(DataError) as excinfo:
        load_data(str(root), input_shape=shape)
    _one_line_error(excinfo, str(root), *words)


# ----------------------------------------------------------------------------------------------------------------------
# MODULE:FUNCTION


def test_callable_tensors(tmp_path, monkeypatch):
    name = _module(
        tmp_path,
        monkeypatch,
        """
        CALLS = []
        def batches():
            CALLS.append(1)
            g = torch.Generator().manual_seed(0)
            return (torch.randn(3, 3, 8, 8, generator=g) for _ in range(4))  # a new generator every call
        """,
    )
    data = load_data(f"{name}:batches", input_shape=SHAPE)
    module = __import__(name)
    assert (data.kind, data.labeled, data.source, len(module.CALLS)) == ("callable", False, f"{name}:batches", 1)
    batches, x, y = _all(data, batch_size=5)
    assert [b[0].shape[0] for b in batches] == [5, 5, 2] and y is None and x.dtype == torch.float32
    again = list(data.batches(5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert [b[0].shape[0] for b in data.batches(4, limit=7)] == [4, 3]
    assert data.count(5) == 5 and len(data) == 12 and data.count(50) == 12


def test_callable_pairs_numpy_and_split(tmp_path, monkeypatch):
    name = _module(
        tmp_path,
        monkeypatch,
        """
        def pairs():
            x = np.arange(10 * 3 * 8 * 8, dtype=np.float64).reshape(10, 3, 8, 8)
            return [(x[:6], np.arange(6, dtype=np.int32)), (torch.from_numpy(x[6:]), torch.arange(6, 10))]
        """,
    )
    data = load_data(f"{name}:pairs", input_shape=SHAPE)
    assert data.labeled
    batches, x, y = _all(data, batch_size=4)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert y.tolist() == list(range(10)) and y.dtype == torch.int64 and x.dtype == torch.float32
    rest, held = data.split(0.3, seed=0)
    rest_y, held_y = _all(rest)[2].tolist(), _all(held)[2].tolist()
    assert len(held_y) == 3 and sorted(rest_y + held_y) == list(range(10))
    assert _all(data.split(0.3, seed=0)[1])[2].tolist() == held_y
    x_held = _all(held)[1]
    np.testing.assert_array_equal(x_held.numpy(), x.numpy()[held_y])


def test_callable_uses_current_directory(tmp_path, monkeypatch):
    name = f"cwd_src_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import torch\ndef f():\n    return [torch.zeros(2, 3, 8, 8)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert len(load_data(f"{name}:f", input_shape=SHAPE)) == 2


_CALLABLE_ERRORS = [
    # (body, attribute, words, at_load)
    ("def f():\n    return [torch.zeros(2, 3, 8, 8)]\n", "missing", ["has no attribute 'missing'"], True),
    ("VALUE = 3\n", "VALUE", ["'VALUE' is a int", "not callable", "expected a function"], True),
    ("def f():\n    raise ValueError('boom')\n", "f", ["calling f()", "ValueError: boom"], True),
    ("def f():\n    return 42\n", "f", ["returned a int", "not iterable", "expected an iterable"], True),
    ("def f():\n    return torch.zeros(2, 3, 8, 8)\n", "f", ["single Tensor", "(2, 3, 8, 8)", "return [x]"], True),
    ("def f():\n    return []\n", "f", ["yielded no samples", "expected at least one"], True),
    ("def f():\n    return ['a']\n", "f", ["item 1", "is a str", "expected a (N, 3, 8, 8) tensor"], True),
    ("def f():\n    return [(1, 2, 3)]\n", "f", ["tuple of length 3", "(inputs, labels) pair"], True),
    ("def f():\n    return [torch.zeros(3, 8, 8)]\n", "f", ["(3, 8, 8) (3-D)", "expected 4-D", "(N, 3, 8, 8)"], True),
    ("def f():\n    return [torch.zeros(2, 1, 8, 8)]\n", "f", ["1 channel(s)", "expected 3 channel(s)"], True),
    ("def f():\n    return [torch.zeros(2, 3, 16, 16)]\n", "f", ["spatial size 16x16", "expected 8x8"], True),
    ("def f():\n    return [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)]\n", "f",
     ["torch.uint8", "floating-point"], True),
    ("def f():\n    x = torch.zeros(2, 3, 8, 8)\n    x[0, 0, 0, :3] = float('nan')\n    return [x]\n", "f",
     ["3 NaN/inf", "expected finite"], True),
    ("def f():\n    return [([1.0], torch.zeros(1))]\n", "f", ["inputs of item 1", "are a list", "torch.Tensor"], True),
    ("def f():\n    return [(torch.zeros(2, 3, 8, 8), torch.zeros(2))]\n", "f", ["labels of item 1", "torch.float32",
     "integer"], True),
    ("def f():\n    return [(torch.zeros(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))]\n", "f",
     ["labels of item 1", "shape (3,)", "expected (2,)"], True),
    ("def f():\n    x = torch.zeros(2, 3, 8, 8)\n    return [x, (x, torch.zeros(2, dtype=torch.long))]\n", "f",
     ["item 2", "pair", "plain inputs", "same kind"], False),
    ("def f():\n    return [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8) / 0]\n", "f",
     ["item 2", "NaN/inf"], False),
    ("def f():\n    yield torch.zeros(2, 3, 8, 8)\n    raise RuntimeError('disk gone')\n", "f",
     ["failed at item 2", "RuntimeError: disk gone"], False),
    ("G = iter([torch.zeros(2, 3, 8, 8)] * 3)\ndef f():\n    return G\n", "f",
     ["same list_iterator", "fresh iterable"], False),
]


_CALLABLE_IDS = [
    "no_attribute", "not_callable", "raises", "not_iterable", "single_tensor", "empty", "wrong_item_type",
    "tuple_of_3", "inputs_3d", "channels", "spatial", "uint8_inputs", "nan", "inputs_list", "float_labels",
    "label_length", "mixed_kinds", "nan_later", "iteration_raises", "same_iterator",
]


@pytest.mark.parametrize("body, attribute, words, at_load", _CALLABLE_ERRORS, ids=_CALLABLE_IDS)
def test_callable_errors(tmp_path, monkeypatch, body, attribute, words, at_load):
    spec = f"{_module(tmp_path, monkeypatch, body)}:{attribute}"
    if at_load:
        with pytest.raises(DataError) as excinfo:
            load_data(spec, input_shape=SHAPE)
    else:
        data = load_data(spec, input_shape=SHAPE)
        with pytest.raises(DataError) as excinfo:
            list(data.batches(4))
    _one_line_error(excinfo, spec, *words)


def test_callable_module_not_importable(tmp_path, monkeypatch):
    bad = _module(tmp_path, monkeypatch, "def f(:\n    pass\n")
    for spec, words in [
        ("no_such_module_xyz:f", ["cannot import module 'no_such_module_xyz'", "ModuleNotFoundError: No module"]),
        (f"{bad}:f", ["cannot import", "SyntaxError"]),
    ]:
        with pytest.raises(DataError) as excinfo:
            load_data(spec, input_shape=SHAPE)
        _one_line_error(excinfo, spec, *words)


def test_callable_exhausted_on_second_pass(tmp_path, monkeypatch):
    spec = _module(
        tmp_path,
        monkeypatch,
        """
        DATA = [torch.zeros(2, 3, 8, 8)]
        def f():
            out = list(DATA)
            DATA.clear()
            return out
        """,
    ) + ":f"
    data = load_data(spec, input_shape=SHAPE)  # the load-time call takes the only data
    with pytest.raises(DataError) as excinfo:
        list(data.batches(4))
    _one_line_error(excinfo, spec, "no samples on this pass")


# ----------------------------------------------------------------------------------------------------------------------
# npz and path errors


def _object_npz(tmp_path: Path) -> str:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    return str(path)


def _write(tmp_path: Path, name: str, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def _truncated_npz(tmp_path: Path) -> str:
    good = Path(_npz(tmp_path, name="good.npz", x=_floats()))
    return _write(tmp_path, "truncated.npz", good.read_bytes()[:200])


def _corrupt_member_npz(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, x=_floats(n=100))
    data = bytearray(path.read_bytes())
    for i in range(200, 400):  # scramble the compressed stream, keep the zip directory
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(path)


def _npy(tmp_path: Path) -> str:
    np.save(tmp_path / "single.npy", _floats())
    return str(tmp_path / "single.npy")


_NAN = _floats()
_NAN[2, 0, 0, 0] = np.nan
_NAN[5, 1, 1, 1] = np.inf

_NPZ_ERRORS = [
    # pytest.param(make path, input shape, mean, std, words, id=...)
    pytest.param(lambda t: _npz(t, images=_floats()), SHAPE, None, None,
                 ["no array named 'x'", "expected", "found arrays: images"], id="missing_x"),
    pytest.param(lambda t: _npz(t, x=_floats()[:, 0]), SHAPE, None, None,
                 ["(10, 8, 8) (3-D)", "expected 4-D", "(N, 3, 8, 8)"], id="x_3d"),
    pytest.param(lambda t: _npz(t, x=_floats(c=1)), SHAPE, None, None,
                 ["1 channel(s)", "expected 3 channel(s)"], id="channels"),
    pytest.param(lambda t: _npz(t, x=_floats(h=8, w=16)), SHAPE, None, None,
                 ["spatial size 8x16", "expected 8x8"], id="spatial"),
    pytest.param(lambda t: _npz(t, x=np.zeros((0, 3, 8, 8), np.float32)), SHAPE, None, None,
                 ["0 samples", "at least one"], id="empty"),
    pytest.param(lambda t: _npz(t, x=_NAN), SHAPE, None, None,
                 ["2 NaN/inf", "first in sample 2", "expected finite"], id="nan_inf"),
    pytest.param(lambda t: _npz(t, x=_uint8().astype(np.int64)), SHAPE, None, None,
                 ["dtype int64", "expected uint8"], id="x_int64"),
    pytest.param(lambda t: _npz(t, x=_floats(), y=np.arange(9)), SHAPE, None, None,
                 ["shape (9,)", "expected (10,)"], id="y_length"),
    pytest.param(lambda t: _npz(t, x=_floats(), y=np.zeros((10, 1), np.int64)), SHAPE, None, None,
                 ["(10, 1)", "expected (10,)"], id="y_2d"),
    pytest.param(lambda t: _npz(t, x=_floats(), y=np.zeros(10)), SHAPE, None, None,
                 ["dtype float64", "integer"], id="y_float"),
    pytest.param(_object_npz, SHAPE, None, None,
                 ["'x'", "Python objects", "refused", "expected a numeric array"], id="object"),
    pytest.param(lambda t: _write(t, "junk.npz", b"hello, not numpy"), SHAPE, None, None,
                 ["not a .npz archive", "expected"], id="not_zip"),
    pytest.param(_truncated_npz, SHAPE, None, None,
                 ["not a .npz archive", "expected"], id="truncated"),
    pytest.param(_corrupt_member_npz, SHAPE, None, None,
                 ["cannot read array 'x'", "expected"], id="corrupt"),
    pytest.param(_npy, SHAPE, None, None,
                 [".npy file", "expected a .npz"], id="npy"),
    pytest.param(lambda t: _npz(t, x=_uint8()), SHAPE, [0.5], None,
                 ["data.mean has 1 value(s)", "3 channel(s)", "expected one"], id="mean_len"),
    pytest.param(lambda t: _npz(t, x=_uint8(c=1)), (1, 1, 8, 8), None, [1.0, 1.0, 1.0],
                 ["data.std has 3 value(s)", "1 channel(s)"], id="std_len"),
    pytest.param(lambda t: _npz(t, x=_uint8()), SHAPE, None, [1.0, 0.0, 1.0],
                 ["data.std must be finite and > 0"], id="std_zero"),
]


@pytest.mark.parametrize("make, shape, mean, std, words", _NPZ_ERRORS)
def test_npz_errors(tmp_path, make, shape, mean, std, words):
    path = make(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_data(path, input_shape=shape, mean=mean, std=std)
    _one_line_error(excinfo, path, *words)


@pytest.mark.parametrize("path", ["does/not/exist.npz", "nowhere", "not a spec:", "a b:c"])
def test_missing_path_lists_formats(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_data(path, input_shape=SHAPE)
    _one_line_error(excinfo, path, "no such file or folder", ".npz", "folder of images", "MODULE:FUNCTION")


def test_object_array_in_y_is_refused(tmp_path):
    path = tmp_path / "y_objects.npz"
    np.savez(path, x=_floats(), y=np.array(["a"] * 10, dtype=object))
    with pytest.raises(DataError) as excinfo:
        load_data(str(path), input_shape=SHAPE)
    _one_line_error(excinfo, str(path), "'y'", "Python objects")


def test_large_uint8_is_normalized_per_batch(tmp_path):
    x = _uint8(n=64)
    data = load_data(_npz(tmp_path, x=x), input_shape=SHAPE)
    assert data._data.x.dtype == np.uint8  # kept compact; converted one batch at a time
    assert [b[0].shape[0] for b in data.batches(16, limit=40)] == [16, 16, 8]


def test_pathlike_and_float16(tmp_path):
    path = Path(_npz(tmp_path, x=_floats(dtype=np.float16)))
    data = load_data(path, input_shape=SHAPE)
    assert data.source == str(path) and _all(data)[1].dtype == torch.float32
