"""Reading training records from local files or the Hugging Face cache, with errors that name file and line.

Every source goes through `datasets` (JSON / JSON Lines, CSV / TSV, Parquet, plain text, a directory written by
`save_to_disk`, or a data set already in the user's cache, by name, offline); `read_parallel` pairs the lines
of two line-aligned text files (a translation corpus). Text files are checked first by a pass of our own,
because the errors of `datasets` and pyarrow do not say which line is bad; that pass also records the line
each record starts on, so later errors (a missing field) can name it too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import NamedTuple

import datasets


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and line (or record and field)."""


class Record(NamedTuple):
    fields: dict  # column name -> value, as `datasets` read it
    where: str  # "train.jsonl:12", "train.parquet row 5", "org/name row 3": for error messages


_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
             ".txt": "text", ".text": "text", ".md": "text"}
SAMPLE_BY = ("document", "paragraph", "line")


def read_records(source: str | Path, *, split: str = "train", text_sample_by: str = "document",
                 cache_dir: str | None = None) -> list[Record]:
    """All records of one source, in order.

    `source` is a file (by suffix: .json/.jsonl, .csv/.tsv, .parquet, .txt/.text/.md), a directory written by
    `Dataset.save_to_disk`, or the name of a data set in the local Hugging Face cache (read offline; `split`
    picks the split). A text file gives records {"text": ...}: the whole file, each blank-line separated
    paragraph, or each line (`text_sample_by`). `cache_dir` is where `datasets` keeps its Arrow copies.
    Raises DataError for an unreadable, malformed or empty source.
    """
    if text_sample_by not in SAMPLE_BY:
        raise ValueError(f"text_sample_by must be one of {SAMPLE_BY}, got {text_sample_by!r}")
    path = Path(source)
    if path.is_dir():
        rows, where = _load_saved(path, split), None
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r} (expected one of {', '.join(_BUILDERS)})")
        rows, where = _load_file(path, builder, text_sample_by, cache_dir)
    elif str(source).count("/") <= 1 and not str(source).startswith((".", "/")) and path.suffix == "":
        rows, where = _load_cached(str(source), split, cache_dir), None
    else:
        raise DataError(f"{source}: no such file")
    if not rows:
        raise DataError(f"{source}: the data set is empty")
    if where is None:
        where = [f"{source} row {i}" for i in range(len(rows))]
    return [Record(r, w) for r, w in zip(rows, where)]


def read_parallel(source: str | Path, target: str | Path, *, keys: tuple[str, str] = ("source", "target")
                  ) -> list[Record]:
    """Records {keys[0]: line of `source`, keys[1]: the same line of `target`} of two line-aligned text files
    (a parallel corpus such as Multi30k's train.en / train.de), in order; "where" names the source file and line.

    Line endings may be LF or CRLF (the "\\r" is dropped); a final line break ends the last line rather than
    starting an empty one. Raises DataError for a missing or non-UTF-8 file, for files whose line counts
    differ (naming both files and both counts), and for an empty pair of files.
    """
    texts = {}
    for name in (source, target):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{name}: no such file")
        text = _decode(path)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        texts[name] = [line.removesuffix("\r") for line in lines]
    src, tgt = texts[source], texts[target]
    if len(src) != len(tgt):
        raise DataError(f"{source} has {len(src)} lines but {target} has {len(tgt)}: parallel files must be "
                        "line-aligned")
    if not src:
        raise DataError(f"{source}: the data set is empty")
    return [Record({keys[0]: s, keys[1]: t}, f"{source}:{n}") for n, (s, t) in enumerate(zip(src, tgt), 1)]


def _load_file(path: Path, builder: str, sample_by: str, cache_dir) -> tuple[list[dict], list[str] | None]:
    """Checks a local file, then loads it with `datasets`: (rows, where each row starts, or None)."""
    kwargs, lines, objects = {}, None, None
    if builder != "parquet":
        text = _decode(path)
        if builder == "json":
            parse = _json_array_lines if text.lstrip().startswith("[") else _json_lines
            lines, objects = parse(path, text)
        elif builder == "csv":
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            header, lines = _csv_lines(path, text, sep)
            # Cells stay the exact strings of the file: no "NA" -> null, no "042" -> 42.
            kwargs = {"sep": sep, "converters": {c: str for c in header}, "na_filter": False}
        else:
            kwargs = {"sample_by": sample_by}
            lines = {"document": [1], "line": range(1, len(text.splitlines()) + 1)}.get(sample_by)
    if lines is not None and not lines:
        raise DataError(f"{path}: the data set is empty")
    try:
        if objects is not None:
            # Already parsed: datasets' JSON reader would turn strings such as "2031-07-04" into timestamps.
            keys = list(dict.fromkeys(k for o in objects for k in o))  # every record's fields, in order
            try:
                ds = datasets.Dataset.from_dict({k: [o.get(k) for o in objects] for k in keys})
            except Exception as e:  # Arrow's errors name neither the record nor the field: find them
                raise DataError(_mixed_types(path, lines, objects, keys, e)) from None
        else:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
    except DataError:
        raise
    except Exception as e:  # pyarrow / pandas errors: keep their first line, say which file
        raise DataError(f"{path}: could not be read ({type(e).__name__}: {_first_line(e)})") from e
    rows = ds.to_list()
    where = None
    if lines is not None and len(lines) == len(rows):
        where = [f"{path}:{n}" for n in lines]
    if builder == "text":  # blank lines and empty files hold no document
        keep = [i for i, r in enumerate(rows) if r["text"].strip()]
        rows = [rows[i] for i in keep]
        where = None if where is None else [where[i] for i in keep]
    return rows, where


def _load_saved(path: Path, split: str) -> list[dict]:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a data set written by save_to_disk ({_first_line(e)})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds.to_list()


def _load_cached(name: str, split: str, cache_dir) -> list[dict]:
    # Offline by construction: training must not depend on the network, nor wait on it.
    with _offline():
        try:
            ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        except Exception as e:
            raise DataError(f"{name}: no such file, nor a data set in the local Hugging Face cache "
                            f"(split {split!r}; {type(e).__name__}: {_first_line(e)})") from e
    return ds.to_list()


@contextlib.contextmanager
def _offline():
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def _json_lines(path: Path, text: str) -> tuple[list[int], list[dict]]:
    """Checks JSON Lines; returns the line number of each record (blank lines skipped) and the records."""
    lines, objects = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        lines.append(n)
        objects.append(obj)
    return lines, objects


def _json_array_lines(path: Path, text: str) -> tuple[list[int], list[dict]]:
    """Checks a JSON array of objects element by element; returns the line each starts on, and the objects."""
    decoder, lines, objects = json.JSONDecoder(), [], []
    line, counted = 1, 0  # line number of text[counted]

    def line_at(i):
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(text.index("[") + 1)
    if i < len(text) and text[i] == "]":
        return lines, objects
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_at(i)}: expected a JSON object, got {type(obj).__name__}")
        lines.append(line_at(i))
        objects.append(obj)
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            if skip(i + 1) != len(text):
                raise DataError(f"{path}:{line_at(skip(i + 1))}: malformed JSON (extra data after the array)")
            return lines, objects
        else:
            raise DataError(f"{path}:{line_at(min(i, len(text)))}: malformed JSON (expected ',' or ']')")


def _csv_lines(path: Path, text: str, sep: str) -> tuple[list[str], list[int]]:
    """The header and the line each row starts on (quoted fields may span lines; blank lines are skipped, as
    pandas does)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    lines, start = [], 1
    try:
        header = next(reader, None)
        start = reader.line_num + 1
        for row in reader:
            if any(cell.strip() for cell in row):
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: the data set is empty")
    return header, lines


def _mixed_types(path: Path, lines: list[int], objects: list[dict], keys: list[str], error: Exception) -> str:
    """The message for records Arrow cannot put in one table: the first field whose values do not share a
    type, and the first line where it differs (found by bisection over the records, each a small table)."""
    for key in keys:
        column = [o.get(key) for o in objects]
        if _fits(column):
            continue
        lo, hi = 1, len(column)  # the shortest failing prefix column[:hi]
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _fits(column[:mid]) else (lo, mid)
        bad = column[hi - 1]
        for earlier in (v for v in column[:hi - 1] if v is not None):
            where = _difference(earlier, bad, key)
            if where is not None:
                name, was, now = where
                return (f"{path}:{lines[hi - 1]}: field '{name}' is {now} here but {was} in earlier records; "
                        f"every record must give a field the same type")
        return f"{path}:{lines[hi - 1]}: field '{key}' does not have the type it has in earlier records"
    return f"{path}: could not be read ({type(error).__name__}: {_first_line(error)})"


def _fits(column: list) -> bool:
    try:
        datasets.Dataset.from_dict({"x": column})
        return True
    except Exception:
        return False


def _difference(a, b, name: str) -> tuple[str, str, str] | None:
    """(where, kind in a, kind in b) of the first place where the JSON values a and b differ in type."""
    if a is None or b is None:
        return None
    if _kind(a) != _kind(b):
        return name, _kind(a), _kind(b)
    if isinstance(a, dict):
        return next((d for k in b if k in a for d in [_difference(a[k], b[k], f"{name}.{k}")] if d), None)
    if isinstance(a, list):
        return next((d for x in a for i, y in enumerate(b) for d in [_difference(x, y, f"{name}[{i}]")] if d),
                    None)
    return None


def _kind(value) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]
