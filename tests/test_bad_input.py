"""Bad input to `costgraph verify`: one line on stderr, exit code 2, and no report file written."""
import struct
import zlib

import pytest
from PIL import Image


def png_header(width: int, height: int) -> bytes:
    """A PNG with a valid signature and IHDR (RGB, 8 bit) but no pixel data: its size is what it claims."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_refused(cli, tmp_path, *argv, says=""):
    report = tmp_path / "report.md"
    code, out, err = cli("verify", *argv, "--report", str(report))
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("costgraph: error: ") and err.count("\n") == 1, err
    assert says in err
    assert not report.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.fixture
def page(tmp_path):
    path = tmp_path / "page.png"
    Image.new("RGB", (900, 700), (255, 255, 255)).save(path)
    return path


def test_truncated_image(cli, tmp_path, page):
    data = page.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    assert_refused(cli, tmp_path, "--image", str(bad), says="truncated")


def test_corrupt_image(cli, tmp_path, page):
    data = bytearray(page.read_bytes())
    data[60:200] = bytes(140)  # zero out the start of the compressed pixel data
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    assert_refused(cli, tmp_path, "--image", str(bad), says="corrupt")


def test_not_an_image(cli, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a page\n")
    assert_refused(cli, tmp_path, "--image", str(bad), says="not an image")


def test_zero_pixel_image(cli, tmp_path):
    bad = tmp_path / "empty.png"
    bad.write_bytes(png_header(0, 100))
    assert_refused(cli, tmp_path, "--image", str(bad))


def test_one_by_twenty_thousand(cli, tmp_path):
    bad = tmp_path / "sliver.png"
    Image.new("RGB", (1, 20000), (0, 0, 0)).save(bad)
    assert_refused(cli, tmp_path, "--image", str(bad), says="too elongated")
    assert_refused(cli, tmp_path, "--size", "1x20000", says="too elongated")


def test_decompression_bomb_header(cli, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))  # 10^10 pixels claimed, 57 bytes on disk
    assert_refused(cli, tmp_path, "--image", str(bomb), says="decompression-bomb")


def test_decompression_bomb_limit(cli, tmp_path, page, monkeypatch):
    # over twice the limit: refused, as Pillow refuses it (over 1x: read with a note, tests/test_pages.py)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # the page has 630,000 pixels
    assert_refused(cli, tmp_path, "--image", str(page), says="decompression-bomb")


@pytest.mark.parametrize("argv,says", [
    (["--image", "no/such/page.png"], "no such image"),
    (["--grid", "0x3"], "positive"),
    (["--size", "12by3"], "malformed size"),
    (["--mode", "base", "--grid", "2x2"], "does not crop"),
    (["--mode", "huge", "--grid", "2x2"], "unknown mode"),
    (["--grid", "2x2", "--device", "gpu"], "invalid choice"),
    (["--grid", "2x2", "--max-num", "1"], "--max-num"),
    (["--grid", "2x2", "--scope", "nowhere"], "unknown scope"),
    (["--grid", "2x2", "--size", "10x10"], "not allowed with"),
    ([], "required"),
])
def test_bad_arguments(cli, tmp_path, argv, says):
    assert_refused(cli, tmp_path, *argv, says=says)


def test_report_folder_must_exist(cli, tmp_path):
    code, out, err = cli("verify", "--grid", "2x2", "--report", str(tmp_path / "missing" / "r.md"))
    assert code == 2 and out == "" and "report folder does not exist" in err and err.count("\n") == 1
