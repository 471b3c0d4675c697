"""Local data read once before ``datasets`` sees it, so what cannot be read is refused by name.

``datasets`` decodes lazily and reports a bad file as "An error occurred while generating the
dataset": a byte that is not UTF-8 in row 90,000 surfaces as a traceback in the middle of a run,
and a path that is neither a folder nor a regular file (a FIFO, a socket) blocks or fails inside
it. Here every local path is checked for its kind, and every data file is decoded and parsed
once: a refusal names the config key, the file and, where there is one, the line.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import stat
from pathlib import Path

from ..config.schema import ConfigError

_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}  # what datasets also opens
_FORMATS = {".jsonl": "one JSON object per line", ".json": "a JSON list of objects (or an object of columns)",
            ".csv": "comma-separated values with a header row", ".parquet": "a Parquet file"}


def check_local_path(where: Path, key: str, accepted: str) -> None:
    """``where`` is a folder or a regular file this process can read."""
    try:
        mode = where.stat().st_mode
    except OSError as e:
        raise ConfigError(f"config key '{key}': {where} cannot be read ({e.strerror or e}); accepted: {accepted}") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ConfigError(f"config key '{key}': {where} is {kind}, neither a folder nor a file; accepted: {accepted}")
    if not os.access(where, os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)):
        raise ConfigError(f"config key '{key}': {where} is not readable by this user (permissions); accepted: {accepted}")


def check_data_file(path: Path, key: str, accepted_paths: str) -> None:
    """``path`` is a readable regular file (``check_local_path``), decoded and parsed (.jsonl,
    .json, .csv, .parquet; gzip, bz2 or xz compressed text too) as ``datasets`` will; refuse what
    fails with the file and the line."""
    check_local_path(path, key, accepted_paths)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        return
    where = f"config key '{key}': {path}"
    accepted = f"accepted: UTF-8 text, {_FORMATS[suffix]}" if suffix != ".parquet" else "accepted: a Parquet file"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except Exception as e:  # noqa: BLE001 - any failure to read it is the file's
            raise ConfigError(f"{where} is not a readable Parquet file ({type(e).__name__}: {_line(e)}); "
                              f"{accepted}") from None
        return
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((o for m, o in _COMPRESSED.items() if magic.startswith(m)), open)
    try:
        with opener(path, "rb") as f:
            if suffix == ".jsonl":
                _check_jsonl(f, where, accepted)
            else:
                lines = [_decode(raw, n, where, accepted) for n, raw in enumerate(f, 1)]
                (_check_json if suffix == ".json" else _check_csv)("".join(lines), where, accepted)
    except (OSError, EOFError, lzma.LZMAError) as e:  # a compressed file cut short, an I/O error
        raise ConfigError(f"{where} cannot be read to its end ({type(e).__name__}: {_line(e)}); {accepted}") from None


def _decode(raw: bytes, n: int, where: str, accepted: str) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: line {n}, byte {e.start + 1} of the line is not UTF-8 ({e.reason}: "
                          f"{raw[e.start:e.start + 4]!r}); {accepted}") from None


def _check_jsonl(f, where: str, accepted: str) -> None:
    rows = 0
    for n, raw in enumerate(f, 1):
        text = _decode(raw, n, where, accepted)
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: line {n} is not JSON ({e.msg} at column {e.colno}); {accepted}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: line {n} is a JSON {type(row).__name__}, not an object (a row); {accepted}")
        rows += 1
    if not rows:
        raise ConfigError(f"{where} has no rows (only blank lines); {accepted}")


def _check_json(text: str, where: str, accepted: str) -> None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: line {e.lineno}, column {e.colno}: not JSON ({e.msg}); {accepted}") from None
    if isinstance(data, list):
        if not data:
            raise ConfigError(f"{where} holds an empty list: no rows; {accepted}")
        bad = next((i for i, row in enumerate(data) if not isinstance(row, dict)), None)
        if bad is not None:
            raise ConfigError(f"{where}: item {bad} of the list is a JSON {type(data[bad]).__name__}, not an object "
                              f"(a row); {accepted}")
    elif not isinstance(data, dict):
        raise ConfigError(f"{where} holds a JSON {type(data).__name__}; {accepted}")


def _check_csv(text: str, where: str, accepted: str) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = None
    try:
        for row in reader:
            if header is None:
                header = len(row)
            elif len(row) > header:  # fewer fields are read as empty values; more are refused by the parser
                raise ConfigError(f"{where}: line {reader.line_num} has {len(row)} fields, the header {header}; "
                                  f"{accepted}")
    except csv.Error as e:
        raise ConfigError(f"{where}: line {reader.line_num}: {e}; {accepted}") from None


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
