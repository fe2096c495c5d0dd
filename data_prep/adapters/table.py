"""Generic catalog adapter: songs / users / interactions tables from CSV, TSV, Parquet or JSON Lines files.

`catalog.path` names a directory (environment variables and `~` are expanded) holding one file per table, named
`songs.*`, `users.*` and `interactions.*` with one of the extensions in `READERS`. `users` is optional: when it is
missing, the users are the distinct `user_id`s of the interaction log (counted in the report).

`catalog.column_map` maps a schema field to the source column that holds it, for every table that has that column
(`{"song_id": "track_id"}`), or for one table only with a table prefix (`{"interactions.timestamp": "played_at"}`);
a prefixed entry wins. A mapped column that is not in the file is an error naming the column and the file.

Text files are read as UTF-8; a file that is not valid UTF-8 is decoded as Latin-1 instead (every byte sequence is
valid Latin-1, and it is what older European exports use), and the number of lines that needed it is counted in the
validation report — the text is kept, never dropped. List fields (`genres`, `tags`, `comments`) may be `a|b`
strings in flat files; the schema validator splits them.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pandas as pd

from llmrec.config import CatalogConfig
from llmrec.schema import REQUIRED, Catalog, SchemaError, ValidationReport, validate_catalog

TABLES = ("songs", "users", "interactions")
READERS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


def expand_path(path: str | os.PathLike) -> Path:
    """`$HOME/data`, `${DATA}/x` and `~` expanded; an unset variable is left as is and then fails to exist."""
    return Path(os.path.expanduser(os.path.expandvars(str(path))))


def decode_text(data: bytes, what: str, report: ValidationReport) -> str:
    """UTF-8, decided line by line: a line that is not valid UTF-8 is decoded as Latin-1 and counted in `report`,
    and every other line stays UTF-8. (Decoding the whole file as Latin-1 because of one bad line garbled every
    Chinese, Korean or emoji title in it.)"""
    if data.startswith(b"\xef\xbb\xbf"):  # spreadsheet exports often start with a BOM
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            report.add(f"{what}.decoded_as_latin1", f"line {number}")
            lines.append(line.decode("latin-1"))
    return "\n".join(lines)


def read_table_file(path: Path, report: ValidationReport, what: str | None = None) -> pd.DataFrame:
    """One table file into a DataFrame; text formats go through `decode_text`. Ids stay strings."""
    what = what or path.stem
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise SchemaError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(READERS)}")
    if kind == "parquet":
        return pd.read_parquet(path)
    text = decode_text(path.read_bytes(), what, report)
    if kind == "jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SchemaError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        return pd.DataFrame(rows)
    # dtype=str keeps ids such as "007" intact; keep_default_na=False so that an artist called "NA" stays one.
    return pd.read_csv(io.StringIO(text), sep="\t" if kind == "tsv" else ",", dtype=str, keep_default_na=False,
                       na_values=[""])


def find_table(directory: Path, table: str) -> Path | None:
    """`directory/<table>.<ext>` for the first supported extension present, else None."""
    for ext in READERS:
        path = directory / f"{table}{ext}"
        if path.is_file():
            return path
    return None


def column_renames(column_map: dict[str, str], table: str) -> dict[str, str]:
    """source column -> schema field for one table; table-prefixed entries override plain ones."""
    plain = {field: src for field, src in column_map.items() if "." not in field}
    scoped = {field.split(".", 1)[1]: src for field, src in column_map.items() if field.startswith(f"{table}.")}
    return {src: field for field, src in {**plain, **scoped}.items()}


def apply_column_map(df: pd.DataFrame, column_map: dict[str, str], table: str, path: Path) -> pd.DataFrame:
    renames = column_renames(column_map, table)
    scoped = {src for field, src in column_map.items() if field.startswith(f"{table}.")}
    # A plain mapping may legitimately not apply to every table (song_id is in songs and interactions, not users);
    # but a column mapped for this table specifically, or a mapped schema field this table needs, must exist.
    needed = {src for src, field in renames.items() if src in scoped or field in REQUIRED[table]}
    missing = sorted(src for src in needed if src not in df.columns)
    if missing:
        fields = [renames[src] for src in missing]
        raise SchemaError(
            f"{path}: column(s) {missing} named in catalog.column_map (for {fields}) are not in the file; "
            f"found {list(df.columns)}"
        )
    return df.rename(columns={src: field for src, field in renames.items() if src in df.columns})


def absolutise_media(songs: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Relative media paths resolve against the source directory; the catalog is saved elsewhere, so pin them."""
    songs = songs.copy()
    for col in ("audio_path", "cover_path"):
        # `pd.isna`, not `is None`: the validator's None is stored as NaN in a string column (pandas >= 3)
        songs[col] = pd.Series([None if not isinstance(p, str) or pd.isna(p) or not p else
                                str((root / p).resolve()) if not Path(p).is_absolute() else p
                                for p in songs[col]], index=songs.index, dtype=object)
    return songs


NO_TIME_AXIS_DATE = pd.Timestamp("2000-01-01", tz="UTC")  # every play of a log without time (catalog.time_axis)


def load_table_catalog(cfg: CatalogConfig) -> Catalog:
    """Load and validate a catalog from `cfg.path` (see the module docstring for the layout)."""
    if not cfg.path:
        raise SchemaError("catalog.source=table needs catalog.path: a directory with songs.* and interactions.*")
    root = expand_path(cfg.path)
    if not root.is_dir():
        raise SchemaError(f"catalog.path {cfg.path!r} ({root}) is not a directory")
    report = ValidationReport()
    frames: dict[str, pd.DataFrame] = {}
    for table in TABLES:
        path = find_table(root, table)
        if path is None:
            if table == "users":
                continue
            raise SchemaError(f"{root}: no {table} file; expected one of "
                              f"{[f'{table}{ext}' for ext in READERS]}")
        df = read_table_file(path, report)
        frames[table] = apply_column_map(df, cfg.column_map, table, path)
    if "users" not in frames:
        frames["users"] = users_from_interactions(frames["interactions"], report)
    if not cfg.time_axis:  # a log without time: one placeholder date, item hold-out split (llmrec.split)
        frames["interactions"] = frames["interactions"].assign(timestamp=NO_TIME_AXIS_DATE)
    elif "timestamp" not in frames["interactions"].columns:
        raise SchemaError(f"{root}: the interactions have no timestamp column; map one with "
                          "--set catalog.column_map.interactions.timestamp=<column>, or say that this log has no "
                          "time axis with --set catalog.time_axis=false")
    media_roots = [expand_path(r) for r in cfg.media_roots]
    songs, users, inter, vreport = validate_catalog(frames["songs"], frames["users"], frames["interactions"], root,
                                                    cfg.max_text_chars, media_roots, cfg.strict)
    merge_reports(report, vreport)
    meta = {"source": "table", "path": str(root), "column_map": dict(cfg.column_map), "split_time": None,
            "media_roots": [str(p.resolve()) for p in (root, *media_roots)], "time_axis": cfg.time_axis}
    return Catalog(absolutise_media(songs, root), users, inter, meta=meta, root=root, report=report)


def users_from_interactions(inter: pd.DataFrame, report: ValidationReport) -> pd.DataFrame:
    if "user_id" not in inter.columns:  # validate_catalog names the missing column for interactions itself
        return pd.DataFrame({"user_id": []})
    ids = pd.unique(inter["user_id"].dropna().astype(str))
    report.counts["users.derived_from_interactions"] += len(ids)
    report.examples.setdefault("users.derived_from_interactions", ["no users file: one user per distinct user_id"])
    return pd.DataFrame({"user_id": ids})


def merge_reports(into: ValidationReport, other: ValidationReport) -> None:
    for kind, n in other.counts.items():
        into.counts[kind] += n
        into.examples.setdefault(kind, []).extend(other.examples.get(kind, []))
