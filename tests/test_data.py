"""Tests for experiments/data/: every source's real loading code on small data made here."""

import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lpwd_optax.experiments import data
from lpwd_optax.experiments.data import cifar as cifar_source
from lpwd_optax.experiments.data import image_folder, pipeline, tfrecord

REAL_CIFAR10_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
MEAN = np.asarray(data.IMAGENET_MEAN, np.float32)
STD = np.asarray(data.IMAGENET_STD, np.float32)


@pytest.fixture(autouse=True)
def _default_cache_location(monkeypatch):
    monkeypatch.delenv("LPWD_OPTAX_CACHE", raising=False)  # caches go under each test's data_dir


def _random_images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _toy(n=100, seed=0):
    """A dataset whose label is the example's index, so outputs can be traced back."""
    return data.ArrayDataset(_random_images(n, seed), np.arange(n, dtype=np.int32), n, "toy")


def _denormalize(x):
    return np.rint((x * STD + MEAN) * 255).astype(np.uint8)


def _write_folder(root, splits, ext=".png"):
    """Writes splits = {split: {class: [uint8 HxWx3 array, ...]}} as an image folder."""
    for split, classes in splits.items():
        for cls, images in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(root / split / cls / f"{i:03d}{ext}")


def _zip_folder(src, dest, wrap="", compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(dest, "w", compression) as z:
        for p in sorted(src.rglob("*")):
            z.write(p, wrap + p.relative_to(src).as_posix())


def _three_class_folder(root):
    imgs = _random_images(18, seed=1)
    # Written out of alphabetical order: labels must follow sorted class names.
    splits = {
        "train": {"cat": list(imgs[0:4]), "ant": list(imgs[4:8]), "bee": list(imgs[8:12])},
        "test": {"cat": list(imgs[12:14]), "ant": list(imgs[14:16]), "bee": list(imgs[16:18])},
    }
    _write_folder(root, splits)
    expected = {
        "train": (np.concatenate([imgs[4:8], imgs[8:12], imgs[0:4]]), [0] * 4 + [1] * 4 + [2] * 4),
        "test": (np.concatenate([imgs[14:16], imgs[16:18], imgs[12:14]]), [0, 0, 1, 1, 2, 2]),
    }
    return expected


# ----------------------------------------------------------------------------- sources


def test_digits():
    train = data.load_dataset("digits", split="train")
    test = data.load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10 and ds.name == "digits"
        np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])  # grey as RGB
    assert np.bincount(test.labels).tolist() == [36] * 10
    assert 0 < train.images.mean() < 128 and train.images.max() == 255
    again = data.load_dataset("digits", split="test")
    np.testing.assert_array_equal(again.images, test.images)


def test_folder_directory_and_zip(tmp_path):
    expected = _three_class_folder(tmp_path / "imgs")
    _zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip", wrap="imgs/")  # one wrapping folder
    _zip_folder(tmp_path / "imgs", tmp_path / "deflated.zip", compression=zipfile.ZIP_DEFLATED)
    for source in (tmp_path / "imgs", tmp_path / "imgs.zip", tmp_path / "deflated.zip"):
        for split in data.SPLITS:
            ds = data.load_dataset(f"folder:{source}", split=split, cache_dir=tmp_path / "c")
            images, labels = expected[split]
            np.testing.assert_array_equal(ds.images, images)  # PNG: lossless
            assert ds.labels.tolist() == labels
            assert ds.num_classes == 3 and ds.name == f"folder:{source}"


def test_folder_cache_is_used_and_keyed_on_the_source(tmp_path, monkeypatch):
    _three_class_folder(tmp_path / "imgs")
    source = tmp_path / "imgs.zip"
    _zip_folder(tmp_path / "imgs", source)
    first = data.load_dataset(f"folder:{source}", split="test", cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2  # both splits decoded at once

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(image_folder, "_decode_images", no_decoding)
    for split in data.SPLITS:
        data.load_dataset(f"folder:{source}", split=split, cache_dir=tmp_path / "c")
    os.utime(source, ns=(0, 0))  # a changed source must not be served from the cache
    with pytest.raises(AssertionError, match="decoded although cached"):
        data.load_dataset(f"folder:{source}", split="test", cache_dir=tmp_path / "c")
    monkeypatch.undo()
    again = data.load_dataset(f"folder:{source}", split="test", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.images, first.images)


def test_folder_resizes_and_converts_to_rgb(tmp_path, caplog):
    root = tmp_path / "imgs"
    _write_folder(root, {"train": {"a": list(_random_images(2))}})
    Image.fromarray(_random_images(1, size=48)[0]).save(root / "train" / "a" / "big.jpg")
    Image.new("L", (32, 32), 77).save(root / "train" / "a" / "grey.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(root / "train" / "a" / "rgba.png")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="lpwd_optax.experiments.data"):
        ds = data.load_dataset(f"folder:{root}", cache_dir=tmp_path / "c")
    assert ds.images.shape == (5, 32, 32, 3) and "resized 1 of 5" in caplog.text
    by_name = dict(zip(["000.png", "001.png", "big.jpg", "grey.png", "rgba.png"], ds.images))
    assert (by_name["grey.png"] == 77).all()
    assert (by_name["rgba.png"] == [1, 2, 3]).all()


def test_folder_errors(tmp_path):
    cache = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'missing'}", cache_dir=cache)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}", cache_dir=cache)
    _write_folder(tmp_path / "trainonly", {"train": {"a": list(_random_images(1))}})
    with pytest.raises(FileNotFoundError, match="no 'test/' folder"):
        data.load_dataset(f"folder:{tmp_path / 'trainonly'}", split="test", cache_dir=cache)
    _zip_folder(tmp_path / "trainonly", tmp_path / "trainonly.zip")
    with pytest.raises(FileNotFoundError, match="no 'test/' folder"):
        data.load_dataset(f"folder:{tmp_path / 'trainonly.zip'}", split="test", cache_dir=cache)
    (tmp_path / "file.tar").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"neither a directory nor a \.zip"):
        data.load_dataset(f"folder:{tmp_path / 'file.tar'}", cache_dir=cache)
    _write_folder(tmp_path / "broken", {"train": {"a": []}})
    (tmp_path / "broken" / "train" / "a" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot decode image train/a/bad\.jpg"):
        data.load_dataset(f"folder:{tmp_path / 'broken'}", cache_dir=cache)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_dataset("digits", split="validation")


class _Unseekable(io.RawIOBase):
    """A file zipfile cannot seek in: it then writes data descriptors after each member."""

    def __init__(self, f):
        self._f = f

    def writable(self):
        return True

    def write(self, b):
        return self._f.write(b)

    def tell(self):
        return self._f.tell()


@pytest.mark.parametrize("kind", ["zip64", "data_descriptors"])
def test_folder_zip64_and_data_descriptors(tmp_path, kind):
    expected = _three_class_folder(tmp_path / "imgs")
    source = tmp_path / f"{kind}.zip"
    with open(source, "wb") as f:
        out = f if kind == "zip64" else _Unseekable(f)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted((tmp_path / "imgs").rglob("*.png")):
                name = p.relative_to(tmp_path / "imgs").as_posix()
                with z.open(name, "w", force_zip64=kind == "zip64") as member:
                    member.write(p.read_bytes())
    with zipfile.ZipFile(source) as z:
        infos = z.infolist()
    if kind == "zip64":
        assert all(i.extract_version == zipfile.ZIP64_VERSION for i in infos)
    else:
        assert all(i.flag_bits & 0x08 for i in infos)  # sizes and CRC follow the data
    for split in data.SPLITS:
        ds = data.load_dataset(f"folder:{source}", split=split, cache_dir=tmp_path / "c")
        np.testing.assert_array_equal(ds.images, expected[split][0])
        assert ds.labels.tolist() == expected[split][1]


def test_folder_zip_member_with_a_bad_crc_is_rejected(tmp_path):
    _three_class_folder(tmp_path / "imgs")
    source = tmp_path / "imgs.zip"
    _zip_folder(tmp_path / "imgs", source)  # stored: a member's bytes lie as they are
    with zipfile.ZipFile(source) as z:
        info = z.getinfo("train/bee/001.png")
    blob = bytearray(source.read_bytes())
    blob[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    source.write_bytes(blob)
    with pytest.raises(data.DataError, match=r"cannot decode image train/bee/001\.png .*CRC"):
        data.load_dataset(f"folder:{source}", cache_dir=tmp_path / "c")


def test_folder_first_decode_reports_progress_and_cache_then_one_line(tmp_path, caplog):
    _three_class_folder(tmp_path / "imgs")
    name, cache = f"folder:{tmp_path / 'imgs'}", tmp_path / "c"
    with caplog.at_level(logging.INFO, logger="lpwd_optax.experiments.data"):
        data.load_dataset(name, split="train", cache_dir=cache)
    first = caplog.text
    train_file, test_file = (next(cache.glob(f"imgs-{s}-*.npz")) for s in data.SPLITS)
    assert "decoding its images (12 train, 6 test) once" in first
    assert f"cached in {train_file} and {test_file}" in first
    assert "decoded 18/18 images (100%)" in first
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lpwd_optax.experiments.data"):
        data.load_dataset(name, split="test", cache_dir=cache)
    assert [r.getMessage() for r in caplog.records] == [f"6 images from the cache {test_file}"]


def test_folder_progress_every_tenth(caplog):
    chunks = [(np.zeros((30, 32, 32, 3), np.uint8), 0)] * 10
    with caplog.at_level(logging.INFO, logger="lpwd_optax.experiments.data"):
        parts = image_folder._collect(iter(chunks), "src.zip", 300, "2 processes")
    assert len(parts) == 10
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" images")[0] for line in lines] == [
        f"src.zip: decoded {n}/300" for n in range(30, 301, 30)
    ]
    assert lines[-1].startswith("src.zip: decoded 300/300 images (100%) in ")
    assert lines[-1].endswith("s with 2 processes")


def _make_config_error(root, case):
    """Builds a broken image-folder source; returns (path, split, the problem's words)."""
    if case == "missing":
        return root / "nowhere", "train", "does not exist"
    if case == "empty_folder":
        (root / "empty").mkdir()
        return root / "empty", "train", "holds no images"
    if case == "no_class_folders":  # images straight under train/
        (root / "flat" / "train").mkdir(parents=True)
        Image.fromarray(_random_images(1)[0]).save(root / "flat" / "train" / "0.png")
        return root / "flat", "train", "holds no images"
    if case == "empty_zip":
        zipfile.ZipFile(root / "empty.zip", "w").close()
        return root / "empty.zip", "train", "holds no images"
    if case == "not_a_zip":
        (root / "file.tar").write_bytes(b"not a zip")
        return root / "file.tar", "train", r"neither a directory nor a \.zip"
    if case in ("no_test_folder", "no_train_folder"):
        split = case.split("_")[1]
        other = "train" if split == "test" else "test"
        _write_folder(root / "one", {other: {"a": list(_random_images(1))}})
        return root / "one", split, f"has no '{split}/' folder"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty_folder",
        "no_class_folders",
        "empty_zip",
        "not_a_zip",
        "no_test_folder",
        "no_train_folder",
    ],
)
def test_data_config_errors_are_one_line_naming_the_path(tmp_path, case):
    path, split, problem = _make_config_error(tmp_path, case)
    with pytest.raises(data.DataError, match=problem) as info:
        data.load_dataset(f"folder:{path}", split=split, cache_dir=tmp_path / "c")
    message = str(info.value)
    assert isinstance(info.value, ValueError)  # what the programs report as a config error
    assert str(path) in message and "\n" not in message
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not REAL_CIFAR10_ZIP.exists(), reason=f"{REAL_CIFAR10_ZIP} not present")
def test_real_cifar10_jpeg_zip(monkeypatch):
    """The shipped zip's layout, and a subset decoded through the worker pool (the full
    60k-image decode is timed by experiments/benchmarks/bench_input.py)."""
    index = image_folder._folder_index(REAL_CIFAR10_ZIP)
    assert index.classes == CIFAR10_CLASSES
    assert {s: len(m) for s, m in index.members.items()} == {"train": 50000, "test": 10000}
    assert np.bincount(index.labels["train"]).tolist() == [5000] * 10
    members, labels = index.members["test"][::25], index.labels["test"][::25]
    assert all(m.split("/")[1] == CIFAR10_CLASSES[y] for m, y in zip(members, labels))
    monkeypatch.setattr(image_folder, "_PARALLEL_DECODE_MIN", 100)
    pooled = image_folder._decode_images(REAL_CIFAR10_ZIP, members)
    serial, resized = image_folder._decode_chunk(str(REAL_CIFAR10_ZIP), members)
    assert pooled.shape == (400, 32, 32, 3) and resized == 0
    np.testing.assert_array_equal(pooled, serial)
    assert 90 < pooled.mean() < 150 and pooled.std() > 40


# ----------------------------------------------------------------------------- CIFAR / TFDS


@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_tfds_mock_data(tmp_path, name, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_dataset(name, data_dir=tmp_path / "tfds", split="test", cache_dir=tmp_path)
    assert ds.images.shape == (24, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.labels.max() < num_classes
    assert ds.num_classes == num_classes and ds.name == name
    assert not list(tmp_path.glob("*.npz"))  # mock data is not cached


def _prepare_tiny_cifar10(data_dir, monkeypatch, n_train=30, n_test=10):
    """Runs TFDS's real download_and_prepare (array_record, no TensorFlow) on generated images."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("importlib_resources")  # needed by tfds to prepare datasets
    from tensorflow_datasets.image_classification import cifar

    images = _random_images(n_train + n_test, seed=3)

    def split_generators(self, dl_manager):
        def examples(lo, hi):
            for i in range(lo, hi):
                yield i, {"id": str(i), "image": Image.fromarray(images[i]), "label": i % 10}

        return {"train": examples(0, n_train), "test": examples(n_train, n_train + n_test)}

    monkeypatch.setattr(cifar.Cifar10, "_split_generators", split_generators)
    tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return images[:n_train], np.arange(n_train) % 10


def _sorted_by_pixels(images, labels):
    order = np.lexsort(images.reshape(len(images), -1).T[::-1])
    return images[order], labels[order]


def _tfrecord_frame(record):
    length = len(record).to_bytes(8, "little")
    crc = lambda b: tfrecord.mask(tfrecord.crc32c(b)).to_bytes(4, "little")
    return length + crc(length) + record + crc(record)


def _to_tfrecord(src, dest):
    """Rewrites a prepared array_record dataset as TFRecord (what tfds.load writes)."""
    from array_record.python.array_record_module import ArrayRecordReader

    shutil.copytree(src, dest)
    version_dir = dest / "cifar10" / "3.0.2"
    for path in version_dir.glob("*.array_record-*"):
        reader = ArrayRecordReader(str(path))
        records = reader.read_all()
        reader.close()
        with open(str(path).replace(".array_record-", ".tfrecord-"), "wb") as f:
            f.write(b"".join(_tfrecord_frame(record) for record in records))
        path.unlink()
    info_file = version_dir / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["fileFormat"] = "tfrecord"
    info_file.write_text(json.dumps(info))


def test_tfds_prepared_array_record_and_tfrecord(tmp_path, monkeypatch):
    images, labels = _prepare_tiny_cifar10(tmp_path / "ar", monkeypatch)
    monkeypatch.undo()
    monkeypatch.delenv("LPWD_OPTAX_CACHE", raising=False)  # undone above: remove it again
    expected = _sorted_by_pixels(images, labels)
    ds = data.load_dataset("cifar10", data_dir=tmp_path / "ar", download=False)
    assert ds.num_classes == 10 and ds.labels.dtype == np.int32
    for got, want in zip(_sorted_by_pixels(ds.images, ds.labels), expected):
        np.testing.assert_array_equal(got, want)
    assert len(list((tmp_path / "ar" / "lpwd_optax_cache").glob("cifar10-train-*.npz"))) == 1
    cached = data.load_dataset("cifar10", data_dir=tmp_path / "ar", download=False)
    np.testing.assert_array_equal(cached.images, ds.images)

    _to_tfrecord(tmp_path / "ar", tmp_path / "tfr")
    shutil.rmtree(tmp_path / "tfr" / "lpwd_optax_cache")
    from_tfrecord = data.load_dataset("cifar10", data_dir=tmp_path / "tfr", download=False)
    np.testing.assert_array_equal(from_tfrecord.images, ds.images)
    np.testing.assert_array_equal(from_tfrecord.labels, ds.labels)

    shard = sorted((tmp_path / "tfr" / "cifar10" / "3.0.2").glob("*train.tfrecord-*"))[0]
    blob = bytearray(shard.read_bytes())
    blob[12 + 40] ^= 0x01  # in the first record's data
    shard.write_bytes(blob)
    shutil.rmtree(tmp_path / "tfr" / "lpwd_optax_cache")
    with pytest.raises(data.DataError, match=rf"{re.escape(str(shard))}: record 0 is corrupted"):
        data.load_dataset("cifar10", data_dir=tmp_path / "tfr", download=False)


def test_crc32c_matches_published_check_values():
    # The CRC catalogue's check value, then RFC 3720 (iSCSI) appendix B.4.
    vectors = {
        b"123456789": 0xE3069283,
        bytes(32): 0x8A9136AA,
        b"\xff" * 32: 0x62A8AB43,
        bytes(range(32)): 0x46DD794E,
        bytes(range(31, -1, -1)): 0x113FDB5C,
        b"": 0,
    }
    assert [tfrecord.crc32c(b) for b in vectors] == list(vectors.values())
    assert tfrecord.crc32c_many(list(vectors)).tolist() == list(vectors.values())
    rng = np.random.default_rng(0)
    chunks = [rng.bytes(int(n)) for n in rng.integers(0, 300, 5000)]  # several vector blocks
    assert tfrecord.crc32c_many(chunks).tolist() == [tfrecord.crc32c(c) for c in chunks]
    assert tfrecord.mask(0) == 0xA282EAD8 and tfrecord.mask(1 << 15) == 0xA282EAD9
    np.testing.assert_array_equal(
        tfrecord.mask(np.array([0, 1 << 15, 0xFFFFFFFF], np.uint32)),
        [tfrecord.mask(0), tfrecord.mask(1 << 15), tfrecord.mask(0xFFFFFFFF)],
    )


@pytest.mark.parametrize(
    ("offset", "problem"),
    [
        (3, r"corrupted \(length CRC\)"),  # a byte of the length
        (9, r"corrupted \(length CRC\)"),  # a byte of the length's CRC
        (12 + 5, r"corrupted \(data CRC\)"),  # a byte of the data
        (-2, r"corrupted \(data CRC\)"),  # a byte of the data's CRC
        (None, "truncated"),  # the file ends inside the record
    ],
)
def test_tfrecord_corrupted_record_is_rejected(tmp_path, offset, problem):
    records = [bytes([i]) * (10 + i) for i in range(5)]
    frames = [_tfrecord_frame(r) for r in records]
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"".join(frames))
    assert tfrecord.read_records(path) == records
    start = sum(map(len, frames[:2]))
    blob = bytearray(path.read_bytes())
    if offset is None:
        del blob[start + 15 :]
    else:
        blob[start + offset % len(frames[2])] ^= 0x01
    path.write_bytes(blob)
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: record 2 is {problem}"):
        tfrecord.read_records(path)


def _cifar_binary_rows(images, labels, label_bytes):
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    prefix = np.repeat(labels[:, None], label_bytes, axis=1).astype(np.uint8)
    return np.concatenate([prefix, chw], axis=1).tobytes()


def _add_to_tar(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("layout", ["binary_tar", "python_tar", "binary_dir"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_original_archives_placed_by_hand(tmp_path, name, layout):
    spec = cifar_source.CIFAR[name]
    n_files = len(spec.binary_files["train"])
    images = _random_images(3 * n_files, seed=4)
    labels = np.arange(3 * n_files) % spec.num_classes
    kind = layout.split("_")[0]
    files = spec.binary_files["train"] if kind == "binary" else spec.python_files["train"]
    blobs = {}
    for i, f in enumerate(files):
        part = slice(3 * i, 3 * i + 3)
        if kind == "binary":
            blobs[f] = _cifar_binary_rows(images[part], labels[part], spec.label_bytes)
        else:
            chw = images[part].transpose(0, 3, 1, 2).reshape(3, -1)
            # As in the release: the labels a list of Python ints.
            blobs[f] = pickle.dumps({b"data": chw, spec.python_label_key: labels[part].tolist()})
    folder_name = spec.binary_dir if kind == "binary" else spec.python_dir
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    if layout == "binary_dir":
        (manual / folder_name).mkdir()
        for f, payload in blobs.items():
            (manual / folder_name / f).write_bytes(payload)
    else:
        archive = spec.binary_archive if kind == "binary" else spec.python_archive
        with tarfile.open(manual / archive, "w:gz") as tar:
            for f, payload in reversed(blobs.items()):  # file order must not matter
                _add_to_tar(tar, f"{folder_name}/{f}", payload)
    ds = data.load_dataset(name, data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.num_classes == spec.num_classes


class _RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Evaluates:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("gadget", [_RunsACommand, _Evaluates])
def test_cifar_python_release_refuses_a_malicious_pickle(tmp_path, gadget):
    spec = cifar_source.CIFAR["cifar10"]
    marker = tmp_path / "was_run"
    payload = (
        f"touch {marker}" if gadget is _RunsACommand else f"open({str(marker)!r}, 'w').close()"
    )
    evil = pickle.dumps({b"data": gadget(payload), b"labels": [0]})
    folder = tmp_path / "downloads" / "manual" / spec.python_dir
    folder.mkdir(parents=True)
    for f in spec.python_files["train"]:
        (folder / f).write_bytes(evil)
    with pytest.raises(data.DataError) as info:
        data.load_dataset("cifar10", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "data_batch_1 is not a CIFAR python batch: refusing to load" in message
    assert ("system" in message) if gadget is _RunsACommand else ("builtins.eval" in message)
    assert not marker.exists()
    pickle.loads(evil)  # the payload is live: plain pickle would have run it
    assert marker.exists()


def test_cifar_python_batch_as_python2_and_numpy1_pickled_it():
    chw = _random_images(2).transpose(0, 3, 1, 2).reshape(2, -1)
    blob = pickle.dumps({b"data": chw, b"labels": [3, 7]}, protocol=2)
    legacy = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in legacy  # the release's array global
    for payload in (blob, legacy):
        batch = cifar_source.load_python_batch(payload, "test_batch")
        np.testing.assert_array_equal(batch[b"data"], chw)
        assert batch[b"labels"] == [3, 7]
    with pytest.raises(data.DataError, match="test_batch is not a CIFAR python batch"):
        cifar_source.load_python_batch(pickle.dumps([1, 2]), "test_batch")
    with pytest.raises(data.DataError, match=r"refusing _codecs\.encode with encoding 'rot13'"):
        cifar_source.load_python_batch(
            b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.",
            "test_batch",
        )


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_says_what_to_do(tmp_path, name):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset(name, data_dir=tmp_path, download=False)
    message = str(info.value)
    assert f"{name} was not found" in message
    assert str(tmp_path / "downloads" / "manual") in message and "folder:" in message
    assert "\n" not in message  # one line
    assert not (tmp_path / "downloads").exists()


# ----------------------------------------------------------------------------- batches


def test_batch_shapes_and_counts():
    ds = _toy(100)
    assert data.num_batches(ds, 32) == 3 and data.num_batches(ds, 32, drop_remainder=False) == 4
    it = data.batches(ds, 32, seed=0, epoch=0)
    assert len(it) == 3
    got = list(it)
    assert len(got) == 3 and len(it) == 0
    for batch in got:
        assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    tail = list(data.batches(ds, 32, seed=0, epoch=0, drop_remainder=False))
    assert [len(b["label"]) for b in tail] == [32, 32, 32, 4]


def test_eval_keeps_order_and_normalizes_with_imagenet_stats():
    ds = _toy(50)
    got = list(data.batches(ds, 10, seed=0, epoch=0, train=False, drop_remainder=False))
    images = np.concatenate([b["image"] for b in got])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in got]), ds.labels)
    np.testing.assert_allclose(images, (ds.images / 255.0 - MEAN) / STD, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(_denormalize(images), ds.images)
    digits = data.load_dataset("digits", split="test")
    batch = next(data.batches(digits, 360, seed=0, epoch=0, train=False))
    expected_mean = (digits.images.mean(axis=(0, 1, 2)) / 255.0 - MEAN) / STD
    got_mean = batch["image"].mean(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(got_mean, expected_mean, atol=1e-5)


def test_flip_about_half_in_training_and_never_in_eval():
    ds = _toy(2000)
    flips = 0
    for batch in data.batches(ds, 200, seed=1, epoch=3):
        originals = ds.images[batch["label"]]
        pixels = _denormalize(batch["image"])
        flipped = (pixels == originals[:, :, ::-1]).all(axis=(1, 2, 3))
        assert (flipped | (pixels == originals).all(axis=(1, 2, 3))).all()
        flips += flipped.sum()
    assert abs(flips / 2000 - 0.5) < 0.05  # > 4 standard deviations
    for batch in data.batches(ds, 200, seed=1, epoch=3, train=False):
        np.testing.assert_array_equal(_denormalize(batch["image"]), ds.images[batch["label"]])


def _epoch(ds, batch_size=16, **kwargs):
    got = list(data.batches(ds, batch_size, **kwargs))
    return np.concatenate([b["label"] for b in got]), np.concatenate([b["image"] for b in got])


def test_order_is_a_deterministic_function_of_seed_and_epoch():
    ds = _toy(96)
    labels, images = _epoch(ds, seed=5, epoch=2)
    again_labels, again_images = _epoch(ds, seed=5, epoch=2, prefetch=0)
    np.testing.assert_array_equal(labels, again_labels)
    np.testing.assert_array_equal(images, again_images)
    assert sorted(labels) == list(range(96))  # a permutation
    assert not np.array_equal(labels, np.arange(96))
    assert not np.array_equal(labels, _epoch(ds, seed=5, epoch=3)[0])
    assert not np.array_equal(labels, _epoch(ds, seed=6, epoch=2)[0])
    resumed_labels, resumed_images = _epoch(ds, seed=5, epoch=2, start_batch=4)
    np.testing.assert_array_equal(resumed_labels, labels[64:])
    np.testing.assert_array_equal(resumed_images, images[64:])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    per_process=st.integers(1, 9),
    process_count=st.sampled_from([1, 2, 4, 8]),
    drop_remainder=st.booleans(),
    train=st.booleans(),
)
def test_process_slices_partition_the_global_batch(
    n, per_process, process_count, drop_remainder, train
):
    ds = _toy(n)
    batch_size = per_process * process_count
    if drop_remainder and n < batch_size:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            data.batches(ds, batch_size, seed=0, epoch=1, drop_remainder=True)
        return
    kwargs = dict(seed=0, epoch=1, train=train, drop_remainder=drop_remainder, prefetch=0)
    whole = list(data.batches(ds, batch_size, **kwargs))
    parts = [
        list(data.batches(ds, batch_size, process_index=p, process_count=process_count, **kwargs))
        for p in range(process_count)
    ]
    assert all(len(p) == len(whole) for p in parts)
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            joined = np.concatenate([p[step][key] for p in parts])
            np.testing.assert_array_equal(joined, batch[key])
        if len(batch["label"]) == batch_size:
            assert all(len(p[step]["label"]) == per_process for p in parts)


def test_bad_batch_arguments():
    ds = _toy(10)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        data.batches(ds, 8, seed=0, epoch=0, process_count=3)
    with pytest.raises(ValueError, match="process_index < process_count"):
        data.batches(ds, 8, seed=0, epoch=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_batch"):
        data.batches(ds, 5, seed=0, epoch=0, start_batch=3)
    with pytest.raises(ValueError, match="uint8"):
        data.ArrayDataset(np.zeros((2, 32, 32, 3)), np.zeros(2, np.int32), 2, "x")


def test_prefetch_reraises_errors_and_stops_when_closed(monkeypatch):
    ds = _toy(64)
    calls = []

    def failing_normalize(images):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return images.astype(np.float32)

    monkeypatch.setattr(pipeline, "_normalize", failing_normalize)
    it = data.batches(ds, 8, seed=0, epoch=0)
    next(it)
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    monkeypatch.undo()

    it = data.batches(_toy(4000), 8, seed=0, epoch=0, prefetch=2)
    next(it)
    it.close()
    with pytest.raises(StopIteration):
        next(it)
    it._thread.join(timeout=5)
    assert not it._thread.is_alive(), "prefetch thread did not stop"
