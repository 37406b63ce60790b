"""Reading the values of a COCO JSON as annotation tools write them: numbers as JSON numbers or numeric strings,
a byte-order mark read past; every fault one line naming the file and the place in it."""

import json
import math

from lean.errors import LeanError


def read_json(path):
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some Windows tools write, is read past
    except FileNotFoundError:
        raise LeanError(f"{path}: no such annotation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LeanError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LeanError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except RecursionError:
        raise LeanError(f"{path}: not a COCO annotation file (its JSON is nested too deep to read)") from None
    if not isinstance(data, dict):
        raise LeanError(f"{path}: not a COCO annotation file (a JSON {type(data).__name__}, not an object)")
    return data


def record_list(data, key, path):
    if key not in data:
        raise LeanError(f"{path}: no {key!r} list (not a COCO annotation file?)")
    if not isinstance(data[key], list):
        raise LeanError(f"{path}: {key} is not a list")
    return data[key]


def field(record, key, path, place):
    if key not in record:
        raise LeanError(f"{path}: {place}: no {key!r}")
    return record[key]


def number(value, path, place):
    """A JSON number, or a string holding one (Roboflow writes some so)."""
    if isinstance(value, bool):
        raise LeanError(f"{path}: {place}: {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise LeanError(f"{path}: {place}: {value!r} is not a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LeanError(f"{path}: {place}: {value!r} is not a number")
    return value


def integer(record, key, path, place):
    value = number(field(record, key, path, place), path, f"{place}.{key}")
    if value != int(value):
        raise LeanError(f"{path}: {place}.{key}: {value!r} is not a whole number")
    return int(value)
