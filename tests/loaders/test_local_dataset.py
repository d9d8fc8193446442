"""LocalDataset: FluxFlow captions parsing, clear errors, buckets, exact resume."""

import io
import json

import pytest
from PIL import Image

from prep.errors import PrepError
from prep.loaders import DataLoader, LocalDataset, MapDataset
from prep.loaders.leaves.local import default_buckets, nearest_bucket, parse_captions


def _img(path, w, h, fmt="JPEG"):
    Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    sizes = {
        "a.jpg": (32, 32),
        "b.jpg": (64, 32),
        "c.png": (32, 64),
        "sub/d.jpg": (40, 40),
        "e.jpg": (66, 30),
        "f.jpg": (30, 62),
        "g.jpg": (33, 33),
    }
    for name, (w, h) in sizes.items():
        _img(imgs / name, w, h, "PNG" if name.endswith(".png") else "JPEG")
    caps = tmp_path / "captions.txt"
    caps.write_text(
        "a.jpg\ta cat\n\n   \nb.jpg\ta wide\tthing with tabs\r\nc.png\ttall\nsub/d.jpg\tsquare\n"
        "e.jpg\twide too\nf.jpg\ttall too\ng.jpg\tsquare too\n",
        "utf-8",
    )
    return imgs, caps, sizes


def test_parse_blank_lines_tabs_and_crlf():
    rows = parse_captions("x.jpg\tone\n\n \t \ny.jpg\ttwo\tthree\r\n", "caps.txt")
    assert rows == [(1, "x.jpg", "one"), (4, "y.jpg", "two\tthree")]


@pytest.mark.parametrize(
    "text,line,msg",
    [
        ("a.jpg\tok\nno tab here\n", 2, "no TAB"),
        ("a.jpg\tok\n\n../etc/passwd\tx\n", 3, "leaves the image folder"),
        ("/abs.jpg\tx\n", 1, "leaves the image folder"),
        ("\tcaption only\n", 1, "empty image name"),
    ],
)
def test_parse_errors_name_file_and_line(text, line, msg):
    with pytest.raises(PrepError, match=msg) as err:
        parse_captions(text, "caps.txt")
    assert f"caps.txt:{line}" in str(err.value)


def test_missing_image_error_names_file_line_and_count(folder):
    imgs, caps, _ = folder
    caps.write_text(caps.read_text() + "nope.jpg\tgone\nalso-nope.jpg\tgone\n")
    with pytest.raises(PrepError) as err:
        LocalDataset(imgs, caps, batch_size=2, rank=0, world_size=1)
    msg = str(err.value)
    assert f"{caps}:10" in msg and "'nope.jpg'" in msg and "1 more" in msg


def test_batches_cover_every_line_once_and_captions_keep_tabs(folder):
    imgs, caps, sizes = folder
    ds = LocalDataset(imgs, caps, batch_size=3, image_size=16, seed=2, rank=0, world_size=1)
    batches = list(DataLoader(ds, rank=0, world_size=1))
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == sorted(sizes) and [len(b["__key__"]) for b in batches] == [3, 3, 1]
    assert batches[0]["jpg"].shape == (3, 3, 16, 16)
    caption = {k: c for b in batches for k, c in zip(b["__key__"], b["txt"], strict=True)}
    assert caption["b.jpg"] == "a wide\tthing with tabs"


def test_duplicate_names_get_distinct_keys(folder):
    imgs, caps, _ = folder
    caps.write_text("a.jpg\tone\na.jpg\ttwo\n")
    ds = LocalDataset(imgs, caps, batch_size=2, image_size=8, shuffle=False, rank=0, world_size=1)
    assert ds.keys == ["a.jpg#1", "a.jpg#2"]


def test_buckets_give_one_size_per_batch_and_cover_everything(folder):
    imgs, caps, sizes = folder
    buckets = [(32, 32), (16, 32), (32, 16)]
    ds = LocalDataset(imgs, caps, batch_size=2, buckets=buckets, seed=1, rank=0, world_size=1)
    dl = DataLoader(ds, rank=0, world_size=1)
    seen = []
    for b in dl:
        h, w = b["jpg"].shape[2:]
        assert (h, w) in buckets
        for k in b["__key__"]:
            iw, ih = sizes[k]
            assert buckets[nearest_bucket(ih, iw, buckets)] == (h, w)
        seen += b["__key__"]
    assert sorted(seen) == sorted(sizes)
    assert (
        len(dl) == ds.batches_per_epoch() == 4
    )  # 3 square -> 2 batches (one short), 2 wide -> 1, 2 tall -> 1
    dropped = LocalDataset(imgs, caps, batch_size=2, buckets=buckets, drop_last=True, rank=0, world_size=1)
    assert dropped.dropped_per_epoch == 1 and dropped.batches_per_epoch() == 3


def _same(sample):
    return sample


def test_a_per_sample_map_keeps_each_batchs_bucket(folder):
    """Samples loaded one by one (a per-sample map) are sized to their batch's bucket, as the batch is;
    they were all cropped to the first bucket's size."""
    imgs, caps, sizes = folder
    buckets = [(32, 32), (16, 32), (32, 16)]
    ds = LocalDataset(imgs, caps, batch_size=2, buckets=buckets, seed=1, rank=0, world_size=1)
    seen = []
    for b in DataLoader(MapDataset(ds, _same, per_sample=True), rank=0, world_size=1):
        for k in b["__key__"]:
            iw, ih = sizes[k]
            assert buckets[nearest_bucket(ih, iw, buckets)] == tuple(b["jpg"].shape[2:])
        seen += b["__key__"]
    assert sorted(seen) == sorted(sizes)


def test_bucketed_resume_is_exact_and_mixing_is_refused(folder):
    imgs, caps, _ = folder

    def make():
        return DataLoader(
            LocalDataset(imgs, caps, batch_size=2, buckets=True, image_size=32, seed=3, rank=0, world_size=1),
            rank=0,
            world_size=1,
        )

    ref = [b["__key__"] for b in make()]
    first = make()
    it = iter(first)
    next(it)
    next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    assert [b["__key__"] for b in resumed] == ref[2:]
    with pytest.raises(PrepError, match="cannot be mixed"):
        make().dataset.next_samples(2)


def test_fetch_samples_for_mixing(folder):
    imgs, caps, _ = folder
    ds = LocalDataset(imgs, caps, batch_size=2, image_size=8, decode="uint8", rank=0, world_size=1)
    ds.bind("")
    samples = ds.fetch_samples(ds.next_samples(3))
    assert len(samples) == 3 and samples[0]["jpg"].shape == (3, 8, 8) and isinstance(samples[0]["txt"], str)


def test_default_buckets_are_near_the_base_area():
    for h, w in default_buckets(512):
        assert h % 64 == 0 and w % 64 == 0 and 0.8 < h * w / 512**2 < 1.2


def test_not_utf8_names_the_line(tmp_path):
    (tmp_path / "i").mkdir()
    caps = tmp_path / "c.txt"
    caps.write_bytes(b"a.jpg\tok\nb.jpg\t\xff\xfe bad\n")
    with pytest.raises(PrepError, match=r"c\.txt:2.*not UTF-8"):
        LocalDataset(tmp_path / "i", caps, batch_size=1, rank=0, world_size=1)


def test_png_and_jpeg_decode_alike(folder):
    imgs, caps, _ = folder
    caps.write_text("c.png\tpng\na.jpg\tjpeg\n")
    ds = LocalDataset(imgs, caps, batch_size=2, image_size=(20, 10), shuffle=False, rank=0, world_size=1)
    b = ds.fetch(ds.next_batch(), 0, 1)
    assert b["jpg"].shape == (2, 3, 20, 10)
    buf = io.BytesIO()
    Image.open(imgs / "c.png").save(buf, format="PNG")
    assert b["__key__"] == ["c.png", "a.jpg"]


def test_a_captions_file_saved_with_a_byte_order_mark_reads_as_without(folder):
    """Windows editors save UTF-8 with a BOM: it is not part of the first image's name (which was then
    '\\ufeffa.jpg', "not in" the folder), and the dataset is the same one, fingerprint included."""
    imgs, caps, _ = folder
    plain = LocalDataset(imgs, caps, batch_size=2, image_size=16, rank=0, world_size=1)
    marked = caps.with_name("marked.txt")
    marked.write_bytes(b"\xef\xbb\xbf" + caps.read_bytes())
    ds = LocalDataset(imgs, marked, batch_size=2, image_size=16, rank=0, world_size=1)
    assert ds.keys == plain.keys and ds.captions == plain.captions and ds.lines == plain.lines
    assert ds.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize("changed", [(0,), (0, 7, 14), tuple(range(0, 30, 3))])
def test_a_bucketed_state_is_refused_when_images_moved_to_other_buckets(tmp_path, changed):
    """A bucketed epoch's plan depends on every image's bucket: images whose aspect changed between the
    save and the resume would make the saved batch number point into another plan (samples repeated and
    missed in that epoch; it was accepted). Changed images that keep their buckets resume exactly."""
    imgs = tmp_path / "i"
    imgs.mkdir()
    shapes = [(16, 16), (32, 16), (16, 32)]  # W x H: square, wide, tall
    for k in range(30):
        _img(imgs / f"{k}.jpg", *shapes[k % 3])
    caps = tmp_path / "c.txt"
    caps.write_text("".join(f"{k}.jpg\tcaption {k}\n" for k in range(30)))

    def make():
        buckets = [(16, 16), (16, 32), (32, 16)]
        return DataLoader(LocalDataset(imgs, caps, batch_size=4, seed=3, buckets=buckets, rank=0,
                                       world_size=1))

    loader = make()
    it = iter(loader)
    seen = [k for _ in range(3) for k in next(it)["__key__"]]
    state = json.loads(json.dumps(loader.state_dict()))
    older = json.loads(json.dumps(state))
    del older["tree"]["buckets"]  # a state saved before the digest was kept: still resumes
    make().load_state_dict(older)
    for k in changed:  # the same bucket: another size of the same aspect
        w, h = shapes[k % 3]
        _img(imgs / f"{k}.jpg", 2 * w, 2 * h)
    resumed = make()
    resumed.load_state_dict(state)
    rest = [k for b in resumed for k in b["__key__"]]
    assert sorted(seen + rest) == sorted(f"{k}.jpg" for k in range(30))
    for k in changed:  # another bucket: square images made wide, the others square
        _img(imgs / f"{k}.jpg", *(shapes[1] if k % 3 == 0 else shapes[0]))
    with pytest.raises(PrepError, match=r"other buckets") as err:
        make().load_state_dict(state)
    assert "\n" not in str(err.value)
