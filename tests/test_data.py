import io

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo
import lookalike.data as data
from lookalike.data import BadImage, Preprocess, list_images, load_array, load_image, resize_array
from lookalike.errors import LookalikeError


def _exif_rotated_jpeg(path, orientation=6):
    im = make_photo(3, (120, 60))  # wide as stored
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6 = rotate 90° clockwise when displayed
    im.save(path, exif=exif)


def test_modes_and_formats(tmp_path):
    base = make_photo(1, (64, 48))
    base.save(tmp_path / "a.png")
    base.save(tmp_path / "b.webp")
    base.save(tmp_path / "c.bmp")
    base.save(tmp_path / "d.tiff")
    base.convert("P").save(tmp_path / "e.gif")
    base.convert("CMYK").save(tmp_path / "f.jpg")
    base.convert("L").save(tmp_path / "g.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white
    rgba.save(tmp_path / "h.png")
    Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)).save(tmp_path / "i16.png")
    for name in ["a.png", "b.webp", "c.bmp", "d.tiff", "e.gif", "f.jpg", "g.png", "h.png", "i16.png"]:
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (64, 48), name
    assert np.asarray(load_image(tmp_path / "h.png")).min() == 255
    a16 = np.asarray(load_image(tmp_path / "i16.png"))[..., 0]
    assert a16.max() > 200 and a16.min() == 0  # scaled from 16 bit, not clipped to white


def test_exif_orientation(tmp_path):
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    assert Image.open(tmp_path / "r.jpg").size == (120, 60)
    assert load_image(tmp_path / "r.jpg").size == (60, 120)


def test_bad_files_have_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a photo")
    buf = io.BytesIO()
    make_photo(2, (200, 200)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    reasons = {}
    for n in ["empty.jpg", "text.jpg", "trunc.jpg"]:
        with pytest.raises(BadImage) as e:
            load_image(tmp_path / n)
        reasons[n] = str(e.value)
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"]


def test_decompression_bomb_guard_kept(tmp_path, monkeypatch):
    make_photo(2, (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression"):
        load_image(tmp_path / "big.png")


def test_reduced_jpeg_decode(tmp_path):
    make_photo(4, (2000, 1500)).save(tmp_path / "big.jpg", quality=90)
    full = load_image(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", min_side=224)
    assert full.size == (2000, 1500)
    assert small.size == (500, 375)  # 1/4 scale: the smallest whose sides both stay >= 224


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    make_photo(1).save(tmp_path / "sub" / "x.JPG")
    make_photo(1).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.jpg").write_text("ignored")
    names = [e.name for e in list_images(tmp_path)]
    assert names == ["a.png", "sub/x.JPG"]
    lst = tmp_path / "list.txt"
    lst.write_text("sub/x.JPG\n\na.png\n")
    assert [e.name for e in list_images(lst)] == ["sub/x.JPG", "a.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LookalikeError, match="no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(LookalikeError, match="no such"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("w,h", [(300, 150), (150, 300), (200, 200), (640, 480), (480, 640)])
def test_bucket_keeps_whole_photo(w, h):
    pre = Preprocess(224, "bucket")
    img = Image.new("RGB", (w, h), (200, 10, 10))
    out = pre(img)
    assert out.shape[0] % 32 == 0 and out.shape[1] % 32 == 0
    red = (out[..., 0] == 200).sum()
    # the whole photo is in the array (resized) and the padding is small
    assert red / (out.shape[0] * out.shape[1]) > 0.7
    assert abs(out.shape[0] * out.shape[1] - 224 * 224) / (224 * 224) < 0.2


def test_crop_mode_cuts_borders():
    """A 400 x 200 photo whose red encodes the column and green the row: the shorter side is resized
    to 224 / 0.875 = 256 (x 1.28) and the centre 224 square cut, so source columns ~112..288 and
    rows ~12..188 end up in the crop, in place and unmirrored; the borders are gone."""
    pre = Preprocess(224, "crop")
    w, h = 400, 200
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.round(0.6 * np.arange(w))[None, :]
    arr[..., 1] = np.round(1.2 * np.arange(h))[:, None]
    arr[..., 2] = 77
    out = pre(Image.fromarray(arr))
    assert out.shape == (224, 224, 3)
    # output pixel j is resized pixel offset + j: source coordinate (offset + j + 0.5) / 1.28 - 0.5
    src_x = (144 + np.arange(224) + 0.5) / 1.28 - 0.5  # offsets: (512 - 224) / 2, (256 - 224) / 2
    src_y = (16 + np.arange(224) + 0.5) / 1.28 - 0.5
    err_x, err_y = np.abs(out[..., 0] - 0.6 * src_x[None, :]), np.abs(out[..., 1] - 1.2 * src_y[:, None])
    assert err_x.max() <= 1.0 and err_y.max() <= 1.0
    assert err_x.mean() < 0.4 and err_y.mean() < 0.4  # a crop one pixel off: 0.47 and 0.91
    assert (out[..., 2] == 77).all()
    assert 0.6 * 100 < out[..., 0].min() and out[..., 0].max() < 0.6 * 300  # the left and right borders are cut


def test_linked_folders_are_followed_but_not_loops(tmp_path):
    import os

    from lookalike.train import list_labelled

    real = tmp_path / "elsewhere"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "a.jpg")
    data = tmp_path / "data"
    (data / "cat-2").mkdir(parents=True)
    (data / "dog").mkdir()
    os.symlink(real, data / "cat")
    os.symlink(data, data / "dog" / "loop")  # leads back up
    Image.new("RGB", (8, 8)).save(data / "cat-2" / "b.jpg")
    Image.new("RGB", (8, 8)).save(data / "dog" / "c.jpg")
    assert [e.name for e in list_images(data)] == ["cat-2/b.jpg", "cat/a.jpg", "dog/c.jpg"]
    # training classes: folder names in order, linked folders included
    assert [(p.relative_to(data).as_posix(), c) for p, c in list_labelled(data)] == [
        ("cat/a.jpg", "cat"), ("cat-2/b.jpg", "cat-2"), ("dog/c.jpg", "dog")]


def test_list_files_with_a_bom_or_not_utf8(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "list.txt").write_bytes("\ufeffa.jpg\n".encode("utf-8"))
    assert [e.name for e in list_images(tmp_path / "list.txt")] == ["a.jpg"]  # the BOM is not part of the name
    (tmp_path / "latin.txt").write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(LookalikeError, match="must be UTF-8"):
        list_images(tmp_path / "latin.txt")


def _photo(w=160, h=120):
    from skimage import data as skd

    return Image.fromarray(skd.astronaut()).resize((w, h), Image.Resampling.LANCZOS)  # detail at every scale


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_array_is_load_image_for_every_exif_orientation(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo(150, 90).save(tmp_path / "o.jpg", exif=exif, quality=92)
    data_ = (tmp_path / "o.jpg").read_bytes()
    assert data._jpeg_array(data_, None, None) is not None  # the simplejpeg path, not the fallback
    want = np.array(load_image(tmp_path / "o.jpg"))
    got = load_array(tmp_path / "o.jpg")
    assert got.shape == want.shape == ((150, 90, 3) if orientation >= 5 else (90, 150, 3))
    assert (got == want).all()


@pytest.mark.parametrize("kind", ["420", "444", "422", "progressive", "grey", "big"])
def test_load_array_matches_pillow_pixel_for_pixel(tmp_path, kind):
    """Same pixels as Pillow's decode, at full size and at every reduced (draft) scale."""
    im, kw = _photo(), dict(quality=90)
    if kind in ("420", "444", "422"):
        kw["subsampling"] = {"444": 0, "422": 1, "420": 2}[kind]
    elif kind == "progressive":
        kw["progressive"] = True
    elif kind == "grey":
        im = im.convert("L")
    else:
        im = _photo(1200, 700)
    im.save(tmp_path / "p.jpg", **kw)
    for min_side in (None, 32, 64, 90, 121, 224, 5000):
        assert data._jpeg_array((tmp_path / "p.jpg").read_bytes(), min_side, None) is not None
        want = np.array(load_image(tmp_path / "p.jpg", min_side=min_side))
        got = load_array(tmp_path / "p.jpg", min_side=min_side)
        assert got.shape == want.shape and (got == want).all(), (kind, min_side)
    if kind == "big":  # the draft scales were used: 1/8 for 64, 1/2 for 224 (700 // 224 = 3)
        assert load_array(tmp_path / "p.jpg", min_side=64).shape == (88, 150, 3)
        assert load_array(tmp_path / "p.jpg", min_side=224).shape == (350, 600, 3)


def test_load_array_falls_back_to_pillow(tmp_path, monkeypatch):
    """CMYK JPEGs and other formats go through Pillow; faults get load_image's reasons."""
    _photo().convert("CMYK").save(tmp_path / "cmyk.jpg")
    _photo().save(tmp_path / "a.png")
    _photo().save(tmp_path / "not_really.png", "JPEG")  # a JPEG whatever its name says
    assert data._jpeg_array((tmp_path / "cmyk.jpg").read_bytes(), None, None) is None
    for n in ("cmyk.jpg", "a.png", "not_really.png"):
        want = np.array(load_image(tmp_path / n))
        got = load_array(tmp_path / n)
        assert got.shape == want.shape and got.dtype == np.uint8 and (got == want).all(), n
    buf = io.BytesIO()
    _photo().save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    for n, reason in (("trunc.jpg", "truncated"), ("empty.jpg", "empty"), ("missing.jpg", "not found")):
        with pytest.raises(BadImage, match=reason):
            load_array(tmp_path / n)
    with pytest.raises(BadImage, match="more than the 100 allowed"):  # the caller's pixel cap
        load_array(tmp_path / "not_really.png", max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # and Pillow's bomb guard
    with pytest.raises(BadImage, match="decompression"):
        load_array(tmp_path / "not_really.png")


@pytest.mark.parametrize("size", [(224, 224), (96, 200), (300, 40), (1, 1), (640, 480), (17, 3)])
def test_resize_array_is_pillows_bilinear_within_one_level(size):
    """torch's uint8 kernel against Pillow's BILINEAR (its reference), shrinking and enlarging."""
    for src in (_photo(348, 348), _photo(1000, 750), _photo(40, 30), _photo(5, 400)):
        want = np.asarray(src.resize(size, Image.Resampling.BILINEAR)).astype(int)
        got = resize_array(src, *size)
        assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        diff = np.abs(got.astype(int) - want)
        # rounding: 0-1 % of values one level off for photo-like shrinking, up to 16 % when the aspect
        # changes 10-fold; no antialiasing or shifted pixel centres would be tens of levels off
        assert diff.max() <= 1 and (diff > 0).mean() < 0.2, (src.size, size, diff.max(), (diff > 0).mean())
    a = np.asarray(_photo(50, 40))[::-1]  # a read-only, negatively strided view is fine too
    assert (resize_array(a, 25, 20) == resize_array(Image.fromarray(np.ascontiguousarray(a)), 25, 20)).all()


@pytest.mark.parametrize("mode", ["bucket", "letterbox", "crop"])
def test_preprocess_takes_arrays_and_pil_images_alike(mode):
    for w, h in ((348, 348), (500, 200), (90, 300)):
        img = _photo(w, h)
        pre = Preprocess(224, mode)
        for scale in (1.0, 0.75):
            assert (pre(np.asarray(img), scale) == pre(img, scale)).all()


def _segment(marker: int, payload: bytes) -> bytes:
    import struct

    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def test_load_array_reads_an_orientation_kept_only_in_xmp(tmp_path):
    """Pillow's getexif falls back to XMP's tiff:Orientation; load_image rotates, so must load_array."""
    xmp = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
           b"xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description "
           b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    _photo(150, 90).save(buf, "JPEG")
    raw = buf.getvalue()
    (tmp_path / "x.jpg").write_bytes(raw[:2] + _segment(0xE1, xmp) + raw[2:])
    assert b"Exif\x00\x00" not in (tmp_path / "x.jpg").read_bytes()
    want = np.array(load_image(tmp_path / "x.jpg"))
    assert want.shape == (150, 90, 3)  # rotated
    assert (load_array(tmp_path / "x.jpg") == want).all()


def test_load_array_multi_picture_and_tiny_files_as_pillow(tmp_path):
    """An MPO is never drafted by Pillow; a JPEG under 8 pixels could be scaled by another n/8."""
    _photo(400, 300).save(tmp_path / "m.jpg", "MPO", save_all=True, append_images=[_photo(400, 300)])
    assert Image.open(tmp_path / "m.jpg").format == "MPO"
    for side in (3, 5, 7):
        _photo(side, side).save(tmp_path / f"t{side}.jpg", quality=95)
    for name, min_side in (("m.jpg", 100), ("t3.jpg", 1), ("t5.jpg", 1), ("t7.jpg", 3)):
        want = np.array(load_image(tmp_path / name, min_side=min_side))
        got = load_array(tmp_path / name, min_side=min_side)
        assert got.shape == want.shape and (got == want).all(), name


def test_load_array_does_not_read_special_files(tmp_path):
    """A FIFO named like a photo is refused at once (load_image's reason), not read until it closes."""
    import os

    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(BadImage, match="empty"):
        load_array(tmp_path / "pipe.jpg")


def test_jpegs_go_through_pillow_when_the_two_decoders_disagree(tmp_path, monkeypatch, caplog):
    import simplejpeg

    _photo().save(tmp_path / "p.jpg")
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: real(*a, **k) // 2)  # another libjpeg, say
    data._decoders_agree.cache_clear()
    try:
        assert not data._decoders_agree()
        assert "decoded by Pillow" in caplog.text
        assert (load_array(tmp_path / "p.jpg") == np.array(load_image(tmp_path / "p.jpg"))).all()
    finally:
        data._decoders_agree.cache_clear()
    monkeypatch.undo()
    assert data._decoders_agree()


def test_resize_array_checks_its_input_and_returns_a_new_array():
    a = np.ascontiguousarray(np.asarray(_photo(40, 30)))
    same = resize_array(a, 40, 30)
    assert same is not a and (same == a).all() and same.flags.c_contiguous
    t = a.transpose(1, 0, 2)  # a view, not C-ordered
    assert resize_array(t, 30, 40).flags.c_contiguous
    for bad in (a.astype(np.float64), a[..., :2], a[..., 0]):
        with pytest.raises(ValueError, match="uint8"):
            resize_array(bad, 20, 15)
    rgba = _photo(40, 30).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: white, as load_image composites it
    assert (resize_array(rgba, 20, 15) == 255).all()
