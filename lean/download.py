"""Fetch the Penn-Fudan archive: checksum verified, extracted without escaping its folder."""

import hashlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from lean.errors import LeanError

PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
PENNFUDAN_MD5 = "5aaa3dee905cef73325923716e38fc6d"
CHUNK = 1 << 20
BUILD_ADVICE = "pass --root DIR with a PennFudan folder, or use --source synthetic"  # lean.cache build's options


def fetch_pennfudan(dest, url=None, md5=None, timeout=30, advice=BUILD_ADVICE):
    """Download and unpack PennFudanPed into `dest`; returns dest/PennFudanPed. `advice`: what the command
    that asked offers instead, said when the download fails."""
    url, md5 = url or PENNFUDAN_URL, md5 or PENNFUDAN_MD5
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {dest}/", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as scratch:
        archive = Path(scratch) / "PennFudanPed.zip"
        download(url, archive, md5, timeout, advice)
        unpacked = Path(scratch) / "unpacked"
        safe_extract(archive, unpacked)
        found = unpacked / "PennFudanPed"
        if not found.is_dir():
            raise LeanError(f"{url}: archive has no PennFudanPed/ folder")
        target = dest / "PennFudanPed"
        found.rename(target)  # same filesystem: the folder appears whole or not at all
    return target


def download(url, path, md5, timeout=30, advice=BUILD_ADVICE):
    """Stream `url` to `path`, failing with one line if unreachable or if the MD5 differs."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise LeanError(f"cannot download {url} ({reason}); {advice}") from None
    if digest.hexdigest() != md5:
        raise LeanError(
            f"{url}: checksum mismatch (MD5 {digest.hexdigest()}, expected {md5}); the download was discarded"
        )


def safe_extract(archive, dest):
    """Extract a zip, refusing members with absolute paths, '..' or links."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise LeanError(f"{archive}: unsafe member name {member.filename!r}")
                if (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise LeanError(f"{archive}: member {member.filename!r} is a symbolic link")
            Path(dest).mkdir(parents=True, exist_ok=True)
            for member in zf.infolist():
                target = Path(dest, *PurePosixPath(member.filename.replace("\\", "/")).parts)
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except zipfile.BadZipFile as error:
        raise LeanError(f"{archive}: not a zip archive ({error})") from None
