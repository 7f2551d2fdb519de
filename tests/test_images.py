"""load_image on the files real archives contain: each bad kind refused with its reason,
each odd-but-valid kind turned into the right 8-bit RGB picture."""
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from eclip.data.images import ImageError, load_image
from eclip.errors import EclipError


@pytest.fixture(scope="module")
def cat():
    return Image.fromarray(skimage.data.chelsea())   # 451 x 300, landscape


def refused(path) -> str:
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert isinstance(info.value, EclipError) and str(path) in str(info.value)
    return info.value.reason


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())


def test_plain_jpeg_loads_as_rgb(real_images):
    im = load_image(real_images["astronaut"])
    assert im.mode == "RGB" and im.size == (512, 512)
    assert diff(im, skimage.data.astronaut()) < 5


def test_missing_file(tmp_path):
    assert refused(tmp_path / "nope.jpg") == "missing"


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("a caption, not a picture\n")
    assert refused(path) == "not an image"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert refused(tmp_path / "empty.jpg") == "empty file"


def test_truncated_jpeg_refused_not_padded(tmp_path, real_images):
    data = real_images["astronaut"].read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert refused(path) == "truncated"
    assert not getattr(__import__("PIL.ImageFile").ImageFile, "LOAD_TRUNCATED_IMAGES")


def test_truncated_png(tmp_path, cat):
    path = tmp_path / "cut.png"
    cat.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert refused(path) == "truncated"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path, real_images):
    path = tmp_path / "locked.jpg"
    path.write_bytes(real_images["coffee"].read_bytes())
    path.chmod(0)
    try:
        assert refused(path).startswith("unreadable")
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported_as_unreadable(tmp_path, monkeypatch):
    """Same mapping as above, where tests run as root and chmod cannot lock a file."""
    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Image, "open", deny)
    assert refused(tmp_path / "x.jpg") == "unreadable (permission denied)"


def test_directory_refused(tmp_path):
    assert refused(tmp_path) == "not a file"


@pytest.mark.parametrize("limit", [1000, 200_000])   # far over (Pillow's error) and just over (its warning)
def test_decompression_bomb(monkeypatch, real_images, limit):
    monkeypatch.setenv("ECLIP_MAX_IMAGE_PIXELS", str(limit))
    assert refused(real_images["astronaut"]) == "decompression bomb (262144 pixels)"
    monkeypatch.setenv("ECLIP_MAX_IMAGE_PIXELS", "300000")
    assert load_image(real_images["astronaut"]).size == (512, 512)


def test_bad_pixel_limit_is_a_user_error(monkeypatch, real_images):
    monkeypatch.setenv("ECLIP_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(EclipError, match="ECLIP_MAX_IMAGE_PIXELS"):
        load_image(real_images["astronaut"])


def test_exif_rotated_jpeg_comes_out_upright(tmp_path, cat):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6   # Orientation: the camera was turned; display rotated 90 degrees clockwise
    cat.save(path, quality=95, exif=exif)
    im = load_image(path)
    assert im.size == (300, 451)
    assert diff(im, cat.transpose(Image.Transpose.ROTATE_270)) < 5
    assert diff(im, cat.transpose(Image.Transpose.ROTATE_90)) > 20


def test_cmyk_jpeg(tmp_path, cat):
    path = tmp_path / "press.jpg"
    cat.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB" and diff(im, cat) < 8


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 256, 32768, 65535]] * 4, dtype=np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32bit_integer_image(tmp_path):
    path = tmp_path / "scan.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I").save(path)
    assert np.asarray(load_image(path))[0, :, 1].tolist() == [0, 255]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 0, 0, 255)      # opaque red
    rgba[0, 1] = (0, 0, 0, 0)          # fully transparent (black underneath)
    rgba[1, :] = (0, 0, 200, 128)      # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    out = np.asarray(load_image(tmp_path / "logo.png")).astype(int)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(out[1, 0, 0] - 127) <= 2 and abs(out[1, 0, 2] - 227) <= 2


def test_grey_with_alpha_and_palette_with_transparency(tmp_path):
    la = Image.fromarray(np.array([[[50, 255], [0, 0]]], dtype=np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png"))[0].tolist() == [[50, 50, 50], [255, 255, 255]]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p.png"))[0].tolist() == [[255, 255, 255], [10, 200, 30]]


def test_image_error_survives_pickling():
    import pickle
    e = pickle.loads(pickle.dumps(ImageError("/x.jpg", "truncated")))
    assert (e.path, e.reason, str(e)) == ("/x.jpg", "truncated", "/x.jpg: truncated")
