"""Bad settings and bad files through the real CLI (issue 12, item 9): every malformed database URL
is exit 2 with a one-line reason, and every image a stage would refuse is refused at `submit`,
with our own message, before anything is written: a text file named .png, an unaccepted format,
a decompression bomb over MAX_IMAGE_PIXELS, a directory, a symbolic link that leaves its folder."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from tests.conftest import ROOT, cli

BAD_URLS = [
    ("postgresql://u:secret@[::1:5432/x", "matching \"]\" in IPv6 host"),
    ("postgresql://u@localhost/x?bogus=1", 'invalid URI query parameter: "bogus"'),
    ("postgresql://%zz@localhost/x", "invalid percent-encoded token"),
    ("postgresql://u@host name/x", "unexpected spaces"),
    ("postgresql://u@localhost:abc/x", "invalid port 'abc'"),
    ("postgresql://u@localhost:99999/x", "invalid port '99999'"),
    ("postgresql://u@localhost:0/x", "invalid port '0'"),
    ("postgresql://u@localhost/x?sslmode=bogus", "invalid sslmode 'bogus'"),
    ("postgresql://u@localhost/x?connect_timeout=soon", "invalid connect_timeout 'soon'"),
    ("postgresql://u@localhost/x?keepalives=abc", "invalid keepalives 'abc'"),
    ("postgresql://u:secret@localhost/x?target_session_attrs=x", "invalid target_session_attrs 'x'"),
    ("mysql://u@localhost/x", "must start with postgresql://"),
    ("host=localhost dbname=x", "must start with postgresql://"),
]


@pytest.mark.parametrize("url,message", BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_every_bad_database_url_is_exit_2_with_one_line(url, message, tmp_path, tiny_png):
    done = cli("submit", str(tiny_png), "--copy", "x", env={"DATABASE_URL": url, "ADFLOW_HOME": str(tmp_path)},
               timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "secret" not in done.stderr  # the password never shows


def test_bad_urls_are_refused_by_every_command_and_variable(tmp_path):
    url = "postgresql://u@[::1:5432/x"
    for args in (("status",), ("db", "upgrade"), ("db", "check"), ("workers", "start")):
        done = cli(*args, env={"DATABASE_URL": url, "ADFLOW_HOME": str(tmp_path)}, timeout=60)
        assert done.returncode == 2 and "DATABASE_URL is not a valid PostgreSQL URL" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    done = cli("status", env={"DATABASE_URL": "", "DB_HOST": "localhost", "DB_PORT": "five",
                              "ADFLOW_HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 2 and "invalid port 'five'" in done.stderr and "DB_HOST" in done.stderr


def test_a_url_libpq_refuses_when_connecting_is_a_config_error():
    """The net behind config's checks: psycopg's ProgrammingError out of connect() is a
    ConfigError (exit 2), with the password hidden."""
    from outbox import config, db

    with pytest.raises(config.ConfigError, match=r"invalid database URL postgresql://u:\*\*\*@.*bogus"):
        db.connect("postgresql://u:secret@localhost/x?bogus=1")
    assert db.safe_url("postgresql://u:secret@[::1/x") == "postgresql://u:***@[::1/x"


# ----------------------------------------------------------------------------- images at submit
def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims another size (how a decompression bomb looks)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def encoded(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def counts(conn) -> tuple:
    return tuple(conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"] for t in ("jobs", "image_assets"))


def test_bad_images_are_refused_at_submit_with_our_messages(conn, db_url, home, tmp_path):
    env = {"DATABASE_URL": db_url, "ADFLOW_HOME": str(home)}
    files = tmp_path / "in"
    files.mkdir()
    (files / "notes.png").write_text("hello, I am a text file\n" * 20)
    (files / "anim.png").write_bytes(encoded("GIF"))
    (files / "scan.jpg").write_bytes(encoded("TIFF"))
    (files / "bomb.png").write_bytes(png_claiming_size(10_000, 5_000))  # 50 MP: over the 40 MP default
    (files / "huge.png").write_bytes(png_claiming_size(40_000, 40_000))  # over Pillow's own limit too
    (files / "tiny.png").write_bytes(encoded("PNG", (8, 8)))
    (files / "cut.png").write_bytes(encoded("PNG", (300, 300))[:-40])
    (files / "empty.png").write_bytes(b"")
    (files / "folder.png").mkdir()
    (tmp_path / "secret.png").write_bytes(encoded("PNG"))
    (files / "escape.png").symlink_to(tmp_path / "secret.png")
    (files / "climb.png").symlink_to("../secret.png")
    (files / "dangling.png").symlink_to(files / "gone.png")
    cases = [
        ("notes.png", "not a recognised image format: not PNG, JPEG or WEBP (480 bytes, starting b'hello, I'"),
        ("anim.png", "image format GIF is not accepted: use PNG, JPEG or WEBP"),
        ("scan.jpg", "image format TIFF is not accepted"),
        ("bomb.png", "decompression bomb: 10000x5000 = 50000000 pixels exceeds the limit of 40000000 (MAX_IMAGE_PIXELS)"),
        ("huge.png", "decompression bomb: 40000x40000 = 1600000000 pixels exceeds the limit of 40000000 "
                     "(MAX_IMAGE_PIXELS)"),
        ("tiny.png", "image too small: 8x8"),
        ("cut.png", "truncated or corrupt"),
        ("empty.png", "image file is empty"),
        ("folder.png", "image path is a directory, not a file"),
        ("escape.png", f"is a symbolic link to {tmp_path / 'secret.png'}, outside {files}: refused"),
        ("climb.png", "is a symbolic link to"),
        ("dangling.png", "image file not found"),
        (".", "image path is a directory"),
    ]
    before = counts(conn)
    for name, message in cases:
        done = cli("submit", str(files / name), "--copy", "Sale", env=env)
        assert done.returncode == 2, (name, done.returncode, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr and "pi_heif" not in done.stderr, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
    # Pillow's own limit (178956970 pixels) is never what the message quotes.
    assert counts(conn) == before and not (home / "artifacts").exists()


def test_the_pixel_limit_comes_from_max_image_pixels(db_url, home, tiny_png):
    env = {"DATABASE_URL": db_url, "ADFLOW_HOME": str(home), "MAX_IMAGE_PIXELS": "3000"}
    done = cli("submit", str(tiny_png), "--copy", "Sale", env=env)
    assert done.returncode == 2 and "64x48 = 3072 pixels exceeds the limit of 3000 (MAX_IMAGE_PIXELS)" in done.stderr
    done = cli("submit", str(tiny_png), "--copy", "Sale", env={**env, "MAX_IMAGE_PIXELS": "lots"})
    assert done.returncode == 2 and "MAX_IMAGE_PIXELS must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_good_images_and_links_inside_their_folder_are_taken(conn, db_url, home, tmp_path):
    env = {"DATABASE_URL": db_url, "ADFLOW_HOME": str(home)}
    files = tmp_path / "in"
    (files / "sub").mkdir(parents=True)
    (files / "a.png").write_bytes(encoded("PNG"))
    (files / "b.jpg").write_bytes(encoded("JPEG"))
    (files / "sub" / "c.webp").write_bytes(encoded("WEBP"))
    (files / "d.png").write_bytes(encoded("JPEG"))  # a JPEG named .png: recorded as what it is
    (files / "link.webp").symlink_to("sub/c.webp")  # inside the link's own folder: followed
    names = ["a.png", "b.jpg", "sub/c.webp", "d.png", "link.webp"]
    done = cli("submit", *[str(files / n) for n in names], "--copy", "Sale", env=env)
    assert done.returncode == 0, done.stderr
    mimes = [r["mime_type"] for r in conn.execute(
        "SELECT a.mime_type FROM jobs_variants v JOIN image_assets a ON a.image_asset_id = v.img_asset_id "
        "WHERE v.job_id = %s ORDER BY v.creation_order", (done.stdout.strip(),))]
    assert mimes == ["image/png", "image/jpeg", "image/webp", "image/jpeg", "image/webp"]


def test_our_image_opening_ignores_ultralytics_patch(tmp_path):
    """ultralytics replaces PIL.Image.open when imported (HEIF through pi_heif, installed on
    demand). Imported first, it must change nothing in what our check says about a text file."""
    probe = """
import ultralytics.utils.patches  # replaces PIL.Image.open
from PIL import Image
assert Image.open.__module__ != "PIL.Image", Image.open.__module__
from stages import imaging
from stages.contract import PermanentStageError
try:
    imaging.check_image(b"hello, I am a text file named .png\\n" * 4)
except PermanentStageError as exc:
    print(exc)
print(imaging.check_image(open(%r, "rb").read()))
"""
    sample = tmp_path / "ok.png"
    sample.write_bytes(encoded("PNG"))
    done = subprocess.run([sys.executable, "-c", probe % str(sample)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env={**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "not a recognised image format: not PNG, JPEG or WEBP" in done.stdout, done.stdout + done.stderr
    assert "('PNG', 64, 64)" in done.stdout
