"""The one page loader (graphs/pages.py) as the vendor's `load_image` reads a page (SPEC section 2,
"Loading"): EXIF orientation applied before the layout, Pillow's default size limits (a large scan
is read with a note, a decompression bomb refused), and the same size on every path: `cost`,
`sweep --folder`, `verify` and the reference preprocessing."""
import json
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from costgraph.graphs.pages import PageWarning, open_page, page_size
from costgraph.verify.preprocess import views_from_file
from costgraph.graphs.deepseek_ocr.config import MODES

A0_300DPI = (9933, 14043)  # 139,489,119 pixels: over Pillow's warning limit, under its error limit


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bilevel_png(path, width: int, height: int, pixels: bool = True):
    """A valid 1-bit greyscale PNG of a white page (a scanner's bilevel scan), written without ever
    holding its pixels: the rows are compressed as they are made (17 MB raw for an A0 scan, a few KB
    on disk). `pixels=False`: the header alone, no IDAT."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    body = b""
    if pixels:
        z, row = zlib.compressobj(9), b"\x00" + b"\xff" * ((width + 7) // 8)
        body = chunk(b"IDAT", b"".join([z.compress(row * 1000) for _ in range(height // 1000)]
                                       + [z.compress(row * (height % 1000)), z.flush()]))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + body + chunk(b"IEND", b""))
    return path


def rotated_jpeg(path, size=(2339, 1654), orientation=6):
    """A page stored landscape whose EXIF says: display it turned (6: a quarter turn clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, (255, 255, 255)).save(path, exif=exif)
    return path


@pytest.fixture
def rotated(tmp_path):
    return rotated_jpeg(tmp_path / "phone_photo.jpg")


# ---- EXIF orientation ------------------------------------------------------------------------

def test_cost_lays_out_a_rotated_photo_as_displayed(cli, rotated):
    code, out, err = cli("cost", "--image", rotated, "--metrics", "flops", "--json")
    assert code == 0 and err == "", err
    lay = json.loads(out)["layout"]
    assert (lay["width"], lay["height"], lay["w_crop"], lay["h_crop"], lay["image_tokens"]) == (1654, 2339, 2, 3, 903)
    code, out, _ = cli("cost", "--image", rotated, "--metrics", "flops")
    assert "page 1654x2339 -> grid 2x3, 6 crops, 903 image tokens" in out


def test_verify_and_the_reference_preprocessing_agree(cli, rotated):
    views = views_from_file(str(rotated), MODES["gundam"])
    assert views.grid == (2, 3) and tuple(views.crops.shape) == (6, 3, 640, 640)
    code, out, err = cli("verify", "--image", rotated, "--device", "meta", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] and data["results"][0]["info"]["grid"] == "2x3"
    assert (data["results"][0]["info"]["layout"]["width"], data["results"][0]["info"]["layout"]["height"]) \
        == (1654, 2339)


def test_sweep_folder_lays_out_a_rotated_photo_as_displayed(cli, tmp_path, rotated):
    code, _, err = cli("sweep", "--folder", tmp_path, "--out", tmp_path / "out", "--no-plots")
    assert code == 0, err
    point = json.load(open(tmp_path / "out" / "sweep.json"))["points"][0]
    assert (point["width"], point["height"], point["w_crop"], point["h_crop"], point["image_tokens"]) \
        == (1654, 2339, 2, 3, 903)


def _png_with_exif(path, orientation, where):
    """A PNG with its orientation in an eXIf chunk before or after the pixel data, or in XMP after it
    (Pillow reads the late ones only when it decodes)."""
    Image.new("RGB", (30, 20), (9, 9, 9)).save(path)
    data = path.read_bytes()
    iend = data.rindex(b"IEND") - 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = chunk(b"eXIf", exif.tobytes()[6:]) if where != "xmp" else chunk(
        b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + f'<rdf:Description tiff:Orientation="{orientation}"/>'.encode())
    at = 33 if where == "early" else iend  # after IHDR, or just before IEND
    path.write_bytes(data[:at] + extra + data[at:])
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["jpeg", "early", "late", "xmp"])
def test_size_and_pixels_agree_for_every_orientation(tmp_path, orientation, kind):
    path = rotated_jpeg(tmp_path / "p.jpg", (30, 20), orientation) if kind == "jpeg" else \
        _png_with_exif(tmp_path / "p.png", orientation, kind)
    turned = (20, 30) if orientation >= 5 else (30, 20)
    with open_page(str(path)) as page:
        assert page.size == turned and page.mode == "RGB"
    assert page_size(str(path)) == turned


# ---- size limits: Pillow's defaults, as the vendor keeps them ------------------------------------

def test_an_a0_scan_at_300_dpi_is_read_with_a_note(cli, tmp_path, monkeypatch):
    scan = bilevel_png(tmp_path / "a0.png", *A0_300DPI)
    assert scan.stat().st_size < 100_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the layout decoded the pixels"))
    code, out, err = cli("cost", "--image", scan, "--metrics", "flops", "--json")
    assert code == 0, err
    lay = json.loads(out)["layout"]
    assert (lay["width"], lay["height"], lay["w_crop"], lay["h_crop"], lay["image_tokens"]) == (*A0_300DPI, 2, 3, 903)
    assert err.startswith("costgraph: note: ") and err.count("\n") == 1 and "139,489,119 pixels" in err
    code, _, err = cli("sweep", "--folder", tmp_path, "--out", tmp_path / "out", "--no-plots")
    assert code == 0 and err.startswith("costgraph: note: ") and err.count("\n") == 1, err
    with pytest.warns(PageWarning, match="a large page"):
        assert page_size(str(scan)) == A0_300DPI


def test_a_page_over_the_warning_limit_is_verified_with_a_note(cli, tmp_path, monkeypatch):
    page = tmp_path / "page.png"
    Image.new("RGB", (900, 700), (255, 255, 255)).save(page)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600_000)  # the page has 630,000 pixels: over 1x, under 2x
    code, out, err = cli("verify", "--image", page)
    assert code == 0 and "PASS" in out, err
    assert err.startswith("costgraph: note: ") and err.count("\n") == 1 and "630,000 pixels" in err


@pytest.mark.parametrize("size,says", [((13000, 14000), "decompression-bomb"),  # 182 MP: over 2x the limit
                                       (A0_300DPI, "no IDAT")])                 # a header and no pixel data
def test_bombs_and_empty_headers_are_refused(cli, tmp_path, size, says):
    bomb = bilevel_png(tmp_path / "bomb.png", *size, pixels=False)
    code, out, err = cli("cost", "--image", bomb)
    assert code == 2 and out == "" and err.startswith("costgraph: error: ") and err.count("\n") == 1, err
    assert says in err


@pytest.mark.parametrize("fmt,damage", [("PNG", "truncated"), ("PNG", "corrupt"), ("JPEG", "truncated")])
def test_the_size_path_still_checks_the_data(cli, tmp_path, fmt, damage):
    """Without a full decode, a damaged file is still refused (PNG: every chunk's CRC; JPEG: a decode at
    1/8 scale)."""
    import numpy as np
    page = tmp_path / f"page.{fmt.lower()}"
    noise = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype("uint8")
    Image.fromarray(noise).save(page, fmt)
    data = bytearray(page.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[200:300] = bytes(100)  # inside the pixel data
    page.write_bytes(bytes(data))
    code, out, err = cli("cost", "--image", page)
    assert code == 2 and out == "" and "corrupt or truncated" in err and err.count("\n") == 1, err


# ---- sweep --folder: a folder named like an image ---------------------------------------------

def test_sweep_folder_reports_a_folder_named_like_an_image(cli, tmp_path):
    pages = tmp_path / "pages"
    (pages / "scans.png").mkdir(parents=True)
    Image.new("RGB", (1654, 2339), (255, 255, 255)).save(pages / "a4.png")
    code, text, err = cli("sweep", "--folder", pages, "--out", tmp_path / "out", "--no-plots", "--json")
    assert code == 0, err
    errors = json.loads(text)["errors"]
    assert [e["page"] for e in errors] == ["scans.png"] and "a folder, not an image file" in errors[0]["error"]
    assert [p["page"] for p in json.load(open(tmp_path / "out" / "sweep.json"))["points"]] == ["a4.png"]
