"""The PennFudan download, against a zip served from this machine: checksum, safe extraction, offline message."""

import hashlib
import io
import zipfile

import pytest

from lean.download import fetch_pennfudan, safe_extract
from lean.errors import LeanError
from lean.pennfudan import default_root


def _zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


GOOD = _zip(
    {
        "PennFudanPed/PNGImages/a.png": b"img",
        "PennFudanPed/PedMasks/a_mask.png": b"mask",
        "PennFudanPed/readme.txt": b"hi",
    }
)


def test_download_checks_the_md5_and_unpacks(tmp_path, serve):
    url = serve(GOOD)
    root = fetch_pennfudan(tmp_path / "data", url=url, md5=hashlib.md5(GOOD).hexdigest())
    assert root == tmp_path / "data" / "PennFudanPed"
    assert (root / "PedMasks" / "a_mask.png").read_bytes() == b"mask"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["PennFudanPed"]  # no scratch left


def test_checksum_mismatch_is_refused_and_nothing_is_kept(tmp_path, serve):
    url = serve(GOOD)
    with pytest.raises(LeanError, match="checksum mismatch"):
        fetch_pennfudan(tmp_path / "data", url=url, md5="0" * 32)
    assert list((tmp_path / "data").iterdir()) == []


def test_offline_download_names_the_alternatives(tmp_path):
    with pytest.raises(LeanError) as error:
        fetch_pennfudan(tmp_path, url="http://127.0.0.1:9/PennFudanPed.zip", timeout=5)
    message = str(error.value)
    assert "cannot download" in message and "--root" in message and "--source synthetic" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "PennFudanPed/../../evil.txt", "C:/evil.txt"])
def test_unsafe_member_names_are_refused(tmp_path, name):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"PennFudanPed/ok.txt": b"ok", name: b"evil"}))
    with pytest.raises(LeanError, match="unsafe member name"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_not_a_zip_is_one_line(tmp_path, serve):
    payload = b"<html>moved</html>"
    with pytest.raises(LeanError, match="not a zip archive"):
        fetch_pennfudan(tmp_path, url=serve(payload), md5=hashlib.md5(payload).hexdigest())


def test_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LEAN_PENNFUDAN", raising=False)
    assert default_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.setenv("LEAN_PENNFUDAN", str(tmp_path / "env"))
    assert default_root(None) == tmp_path / "env"
    monkeypatch.delenv("LEAN_PENNFUDAN")
    (tmp_path / "data" / "PennFudanPed").mkdir(parents=True)
    assert default_root(None, download_to=tmp_path / "data") == tmp_path / "data" / "PennFudanPed"


def test_default_root_downloads_when_nothing_is_there(tmp_path, monkeypatch, serve):
    monkeypatch.delenv("LEAN_PENNFUDAN", raising=False)
    monkeypatch.setattr("lean.download.PENNFUDAN_URL", serve(GOOD))
    monkeypatch.setattr("lean.download.PENNFUDAN_MD5", hashlib.md5(GOOD).hexdigest())
    root = default_root(None, download_to=tmp_path / "data")
    assert root == tmp_path / "data" / "PennFudanPed" and (root / "readme.txt").read_bytes() == b"hi"
