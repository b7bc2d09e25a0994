"""The adapter library: a SQLite database plus one folder of files per adapter.

Layout under the studio home (``$STUDIO_HOME``, else ``~/.studio``)::

    library.sqlite          one row per adapter (name, method, kind, base family, triggers, ...)
    library.lock            taken by every writer (``flock``): one write at a time, across processes
    adapters/<name>/        the adapter's .safetensors file, samples/*.png, train_config.json, and
                            studio_library.json (kind, description, triggers, created: what the
                            user set, so a lost database is rebuilt from the folders by importing them)
    .library-tmp/           staging copies and trash of writes in flight (empty at rest)

Every write follows one protocol so that a process killed at any instant leaves the database and
the folders consistent:

1. files are copied into ``.library-tmp/add-<id>/`` (fsynced) while the library lock is held;
2. one transaction records the intent: the row, in state ``adding`` / ``removing`` / ``renaming``,
   with the temporary paths in ``pending``. This commit is the point of no return;
3. the folders are moved with atomic renames, then a second transaction marks the row ``ready``
   (or deletes it).

Readers see only ``ready`` rows. Whoever next takes the lock (any later write, or a read that finds
an unfinished row and a free lock) finishes the interrupted operation from its row and deletes
what is left in ``.library-tmp``: a write killed before step 2 leaves nothing, one killed after
it is completed. The lock is released by the kernel when its holder dies, which tells an
interrupted write from one in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from studio.errors import StudioError
from studio.home import studio_home

log = logging.getLogger(__name__)

DB_NAME = "library.sqlite"
LOCK_NAME = "library.lock"
ADAPTERS_DIR = "adapters"
TMP_DIR = ".library-tmp"
SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("subject", "style", "content", "combined", "other")  # combined: Break-for-Make
# names become folder names and appear in prompts as <lora:NAME:0.8>: no separators, colons or brackets
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXTRA_FILES = ("train_config.json", "adapter_config.json")  # small companions copied with the weights
RECORD_FILE = "studio_library.json"  # in each library folder: the fields the user set (see the module doc)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LOCK_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_OPERATION = {"adding": "add", "removing": "removal", "renaming": "rename"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,  -- folders collide by case on macOS and Windows
    file TEXT NOT NULL,                         -- file name inside adapters/<name>/
    method TEXT NOT NULL,
    kind TEXT NOT NULL,
    family TEXT NOT NULL DEFAULT '',
    base TEXT NOT NULL DEFAULT '',
    base_hash TEXT NOT NULL DEFAULT '',
    triggers TEXT NOT NULL DEFAULT '[]',        -- JSON list
    description TEXT NOT NULL DEFAULT '',
    train_config TEXT NOT NULL DEFAULT '{}',    -- JSON object
    samples TEXT NOT NULL DEFAULT '[]',         -- JSON list of paths relative to the folder
    created REAL NOT NULL,
    file_hash TEXT NOT NULL,                    -- sha256 of the file
    embedding BLOB,                             -- .npy bytes of the retrieval vector (AutoLoRA)
    state TEXT NOT NULL DEFAULT 'ready',        -- ready | adding | removing | renaming
    pending TEXT                                -- JSON: temporary paths of the operation in flight
);
"""


def _checkpoint(stage: str) -> None:
    """A named point inside a write; does nothing. The crash tests replace it to stop a process there.

    Stages: ``copying`` (part of a file staged), ``staged``, ``committed``, ``moved``, ``done`` (add);
    ``remove-committed``; ``rename-committed``.
    """


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AdapterRecord:
    """One adapter of the library."""

    name: str
    path: Path  # the adapter's folder inside the library
    file: Path  # its .safetensors file (what loaders read)
    method: str
    kind: str
    family: str
    base: str
    base_hash: str
    triggers: list[str]
    description: str
    train_config: dict
    samples: list[Path]
    created: float
    file_hash: str  # sha256 of the file

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able values (paths as strings)."""
        d = dataclasses.asdict(self)
        d.update(path=str(self.path), file=str(self.file), samples=[str(p) for p in self.samples])
        return d


def close_matches(name: str, names: list[str], n: int = 3) -> list[str]:
    """Names that look like ``name``: spelling neighbours first, then names containing it."""
    lower = {x.lower(): x for x in names}
    found = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)]
    if len(name) >= 3:  # shorter substrings match nearly everything
        found += [x for x in names if name.lower() in x.lower() and x not in found]
    return found[:n]


def check_name(name: str) -> str:
    """``name`` when it can name an adapter; a StudioError saying what is allowed otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        suggestion = derive_name(str(name))
        raise StudioError(f"adapter name {name!r}: use 1 to 80 letters, digits, '.', '_' or '-', starting with a "
                          f"letter or digit (e.g. {suggestion})")
    return name


def derive_name(text: str) -> str:
    """A valid adapter name made from a file or folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80].rstrip("._-")
    return name or "adapter"


# ----------------------------------------------------------------------------------------------
# reading adapter files: what a file is, whatever wrote it
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """An adapter outside the library, identified."""

    file: Path
    folder: Path | None  # the training/adapter folder whose samples and config come along
    name_hint: str
    # what the file says: method, kind, family, base, base_hash, triggers, description, train_config
    info: dict[str, Any]
    created: float | None = None  # kept when the source is a library folder (a backup, a rebuild)

    def columns(self, kind: str, description: str, created: float) -> dict[str, Any]:
        """The database columns it makes (those that do not depend on where it is copied)."""
        i = self.info
        return dict(method=i["method"], kind=kind, family=i["family"], base=i["base"], base_hash=i["base_hash"],
                    triggers=json.dumps(i["triggers"]), description=description or i["description"],
                    train_config=json.dumps(i["train_config"], default=str), created=created)


def _header(file: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {tensor name: shape}) of a .safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return dict(fh.metadata() or {}), {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds on a damaged file
        raise StudioError(f"{file}: not a readable .safetensors file ({str(exc).splitlines()[0][:200]}); "
                          f"is the download or copy complete?") from exc


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


def _locate(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, folder of its companions) of an adapter file or folder path."""
    from studio.adapters.core import LORA_FILE, STUDIO_FILE, adapter_file
    from studio.formats.kohya import PEFT_WEIGHT_NAME

    p = Path(path).expanduser()
    if p.is_dir():
        saved = _json(_read_text(p / RECORD_FILE), {})
        named = str(saved.get("file", "")) if isinstance(saved, dict) else ""
        if named and "/" not in named and (p / named).is_file():  # a library folder says which file it is
            return p / named, p
        if (p / PEFT_WEIGHT_NAME).is_file() and not any((p / n).is_file() for n in (LORA_FILE, STUDIO_FILE)):
            return p / PEFT_WEIGHT_NAME, p
        several = [f for f in p.glob("*.safetensors") if f.name not in (LORA_FILE, STUDIO_FILE)]
        if len(several) > 1 and not any((p / n).is_file() for n in (LORA_FILE, STUDIO_FILE)):
            raise StudioError(f"{p}: holds {len(several)} .safetensors files; add one of them by its path, or all "
                              f"with `studio library import {p}`")
        return adapter_file(p), p
    if not p.exists():
        raise StudioError(f"{p}: no such adapter file or folder")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise StudioError(f"{p}: pickled weights ({p.suffix}) can run code when loaded; the library takes "
                          f".safetensors files only: convert it first")
    f = adapter_file(p)
    # the standard file names belong to a folder (a training run): its samples come along
    return f, (f.parent if f.name in (LORA_FILE, STUDIO_FILE, PEFT_WEIGHT_NAME) else None)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _kohya_triggers(header: dict[str, str]) -> list[str]:
    """Trigger words of a kohya file: modelspec's trigger phrase, else its most frequent caption tags,
    else the instance prompts of its ``N_prompt`` dataset folders."""
    phrase = header.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [t.strip() for t in phrase.split(",") if t.strip()]
    counts: dict[str, int] = {}
    freq = _json(header.get("ss_tag_frequency"), {})
    for tags in (freq.values() if isinstance(freq, dict) else []):
        for tag, n in (tags.items() if isinstance(tags, dict) else []):
            if isinstance(n, (int, float)) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    if counts:
        # the trigger is in (nearly) every caption; tags seen in fewer than half of those are content
        top = max(counts.values())
        ranked = sorted(counts, key=lambda t: (-counts[t], t))
        return [t for t in ranked if counts[t] * 2 >= top][:5]
    dirs = _json(header.get("ss_dataset_dirs"), {})
    prompts = [m.group(1).strip() for d in (dirs if isinstance(dirs, dict) else [])
               if (m := re.match(r"^\d+_(.+)$", str(d)))]
    return sorted(set(p for p in prompts if p))[:5]


def _family_of(file: Path, header: dict[str, str], keys: list[str], layout: str | None) -> str:
    """sd1 / sd2 / sdxl / ldm from the header, the key names, then the layer widths; '' when unsure."""
    from studio.adapters.core import META_PREFIX
    from studio.formats.kohya import KOHYA_TE1, KOHYA_TE2, LoraFile, guess_family, read_lora

    for key in (f"{META_PREFIX}base_family", f"{META_PREFIX}family"):
        if header.get(key):
            return header[key]
    fam = guess_family(LoraFile(file, layout or "", [], dict(header)))  # ss_base_model_version, modelspec
    if fam:
        return fam
    if any(k.startswith((KOHYA_TE1 + "_", KOHYA_TE2 + "_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    try:  # the widths of the cross-attention and text-encoder layers (reads the tensors)
        return read_lora(file).family or ""
    except StudioError as exc:
        log.debug("%s: family unknown (%s)", file, exc)
        return ""


def _inspect(path: str | os.PathLike) -> _Source:
    """Identify an adapter file or folder: studio, diffusers/PEFT, kohya LoRA/LoCon, LyCORIS LoHa/LoKr, or
    a library folder (whose record file brings back what the user set)."""
    file, folder = _locate(path)
    src = _identify(file, folder)
    saved = _json(_read_text(folder / RECORD_FILE), None) if folder is not None else None
    if isinstance(saved, dict):
        src.name_hint = folder.name
        if saved.get("kind") in KINDS:
            src.info["kind"] = saved["kind"]
        src.info["description"] = str(saved.get("description") or src.info["description"])
        if isinstance(saved.get("triggers"), list):
            src.info["triggers"] = [str(t) for t in saved["triggers"]]
        if isinstance(saved.get("created"), (int, float)):
            src.created = float(saved["created"])
    return src


def _identify(file: Path, folder: Path | None) -> _Source:
    from studio.adapters.core import LORA_FILE, META_PREFIX, STUDIO_FILE
    from studio.formats.kohya import PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, detect_lora_format

    header, shapes = _header(file)
    keys = list(shapes)
    hint = folder.name if file.name in (LORA_FILE, STUDIO_FILE, PEFT_WEIGHT_NAME) and folder else file.stem
    meta = {k[len(META_PREFIX):]: v for k, v in header.items() if k.startswith(META_PREFIX)}
    layout = detect_lora_format(keys)
    if "method" in meta:  # written by the studio: its header says everything
        config = _json(meta.get("train_config"), None)
        if not isinstance(config, dict) and folder is not None:
            config = _json(_read_text(folder / "train_config.json"), None)
        return _Source(file, folder, hint, dict(
            method=meta["method"], kind=meta.get("kind", ""), family=_family_of(file, header, keys, layout),
            base=meta.get("base", ""), base_hash=meta.get("base_hash", ""),
            triggers=[t.strip() for t in meta.get("trigger", "").split(",") if t.strip()],
            description=meta.get("description", ""), train_config=config if isinstance(config, dict) else {}))
    if layout is None:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        raise StudioError(f"{file}: not an adapter: no LoRA, LoHa or LoKr weights among its {len(keys)} tensors "
                          f"(keys like {sample}); is it a full model checkpoint or an embedding?")
    method = {"lycoris-loha": "loha", "lycoris-lokr": "lokr"}.get(layout, "lora")
    if method == "lora":
        if any(k.endswith(("dora_scale", "lora_magnitude_vector")) for k in keys):
            method = "dora"
        elif any(k.endswith("lora_down.weight") and len(s) == 4 and s[2:] != [1, 1] for k, s in shapes.items()):
            method = "locon"  # kohya/LyCORIS LoRA with 3x3 convolutions (resnets) too
    peft_config = _json(_read_text(folder / PEFT_CONFIG_NAME), {}) if layout == "peft" and folder else {}
    if isinstance(peft_config, dict):
        peft_type = str(peft_config.get("peft_type", "")).upper()
        method = {"LORA": method, "LOHA": "loha", "LOKR": "lokr"}.get(peft_type, method)
    config = {k: v for k, v in header.items()
              if k.startswith("ss_") and k not in ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info",
                                                   "ss_datasets")}
    description = header.get("modelspec.description", "") or header.get("ss_training_comment", "")
    return _Source(file, folder, hint, dict(
        method=method, kind="", family=_family_of(file, header, keys, layout), base=header.get("ss_sd_model_name", ""),
        base_hash=header.get("ss_new_sd_model_hash", "")[:10], triggers=_kohya_triggers(header),
        description="" if description == "None" else description, train_config=config))


def adapter_family(path: str | os.PathLike) -> str:
    """The base-model family an adapter file or folder was made for ('' when it does not say)."""
    return _inspect(path).info["family"]


# ----------------------------------------------------------------------------------------------
# files: copies that are whole or absent
# ----------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; Windows has no directory handles to sync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path, hashed: bool = False) -> str:
    """Copy a file, fsynced; returns its sha256 when ``hashed``."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        first = True
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
            if hashed:
                digest.update(chunk)
                if first:
                    fout.flush()
                    _checkpoint("copying")
                    first = False
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest() if hashed else ""


def _sha256(path: Path) -> str:
    from studio.generation import file_sha256  # cached per (path, size, mtime): re-imports are quick

    return file_sha256(path)


def _samples_of(folder: Path | None) -> list[Path]:
    if folder is None or not (folder / "samples").is_dir():
        return []
    return sorted(p for p in (folder / "samples").iterdir() if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class FileLock:
    """An exclusive lock on a file, released by the kernel when the process dies (flock / msvcrt)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the lock; False when another holder keeps it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        try:
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock on every platform
            self.fd = None


# ----------------------------------------------------------------------------------------------
# the library
# ----------------------------------------------------------------------------------------------


def _db_errors(fn: Callable) -> Callable:
    """sqlite errors as one StudioError naming the database and the fix."""

    @functools.wraps(fn)
    def wrapper(self: Library, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StudioError(f"{self.db_path}: the library database is busy (another studio process holds "
                                  f"it); try again") from exc
            raise self._unreadable(exc) from exc
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from exc

    return wrapper


class Library:
    """The adapter library of a studio home: ``<home>/library.sqlite`` and ``<home>/adapters/<name>/``.

    Nothing is created on disk until the first write; reads of a library that does not exist yet
    see an empty one. Each call opens its own short-lived connection, so one ``Library`` may be
    used from several threads and several processes may share a home.
    """

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else studio_home()
        self.db_path = self.home / DB_NAME
        self.adapters_dir = self.home / ADAPTERS_DIR
        self.tmp_dir = self.home / TMP_DIR

    def __repr__(self) -> str:
        return f"Library({str(self.home)!r})"

    # -- connections ---------------------------------------------------------------------------
    def _unreadable(self, exc: Exception) -> StudioError:
        return StudioError(f"{self.db_path}: the library database cannot be read ({exc}); move it aside and "
                           f"rebuild it from the adapter folders with `studio library import {self.adapters_dir}`")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(str(self.db_path), timeout=30.0, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StudioError(f"{self.db_path}: made by a newer diffusion-studio (library schema {version}, "
                                  f"this one reads {SCHEMA_VERSION}); upgrade the studio")
            if version < SCHEMA_VERSION:
                with _transaction(con):
                    con.execute(_SCHEMA)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            con.close()
            raise
        return con

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """A connection for reads (None: no library yet); finishes an interrupted write if nobody is writing."""
        if not self.db_path.exists():
            yield None
            return
        con = self._connect()
        try:
            leftovers = self.tmp_dir.is_dir() and any(self.tmp_dir.iterdir())
            if leftovers or con.execute("SELECT 1 FROM adapters WHERE state != 'ready' LIMIT 1").fetchone():
                lock = FileLock(self.home / LOCK_NAME)
                locked = False
                with contextlib.suppress(OSError):  # a read-only home: read what is there
                    locked = lock.acquire(timeout=0)
                if locked:
                    try:
                        self._recover(con)
                    finally:
                        lock.release()
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """Exclusive write access: the library lock, with any interrupted write finished first."""
        try:
            self.adapters_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudioError(f"{self.home}: cannot create the library folders ({exc.strerror or exc}); "
                              f"set STUDIO_HOME to a writable folder") from exc
        lock = FileLock(self.home / LOCK_NAME)
        try:
            got = lock.acquire(timeout=LOCK_TIMEOUT_S)
        except OSError as exc:
            raise StudioError(f"{self.home}: cannot write to the library ({exc.strerror or exc}); "
                              f"set STUDIO_HOME to a writable folder") from exc
        if not got:
            raise StudioError(f"{self.home}: the library is busy (another studio process has been writing to it "
                              f"for {LOCK_TIMEOUT_S:.0f}s); try again when it is done")
        try:
            con = self._connect()
            try:
                self._recover(con)
                yield con
            finally:
                con.close()
        finally:
            lock.release()

    # -- the write protocol -------------------------------------------------------------------
    def _recover(self, con: sqlite3.Connection) -> None:
        """Finish every write that passed its commit point; delete what earlier writes left in the tmp folder.

        Runs with the lock held, so nothing it touches belongs to a write in progress.
        """
        keep: set[str] = set()
        for row in con.execute("SELECT * FROM adapters WHERE state != 'ready'").fetchall():
            try:
                log.info("library: finishing an interrupted %s of %r", _OPERATION.get(row["state"], row["state"]),
                         row["name"])
                self._finish(con, row)
            except OSError as exc:
                log.warning("library: cannot finish the %s of %r yet (%s)", row["state"], row["name"], exc)
                keep.update(str(v) for v in _json(row["pending"], {}).values())
        if self.tmp_dir.is_dir():
            for entry in self.tmp_dir.iterdir():
                if entry.name not in keep:
                    _remove_path(entry)

    def _finish(self, con: sqlite3.Connection, row: sqlite3.Row) -> None:
        """Steps 3 of the protocol for a committed row: move the folders, then settle the row. Idempotent."""
        pending = _json(row["pending"], {})
        folder = self.adapters_dir / row["name"]
        trash = self.tmp_dir / pending["trash"] if pending.get("trash") else None
        if row["state"] == "adding":
            staging = self.tmp_dir / pending["staging"]
            if staging.exists():  # not moved in yet: whatever holds the name is the replaced version
                if folder.exists() and trash is not None:
                    os.rename(folder, trash)
                os.rename(staging, folder)
                _fsync_dir(self.adapters_dir)
            _checkpoint("moved")
            with _transaction(con):
                con.execute("UPDATE adapters SET state = 'ready', pending = NULL WHERE id = ?", (row["id"],))
            _checkpoint("done")
        elif row["state"] == "removing":
            if folder.exists():
                os.rename(folder, trash)
                _fsync_dir(self.adapters_dir)
            with _transaction(con):
                con.execute("DELETE FROM adapters WHERE id = ?", (row["id"],))
        elif row["state"] == "renaming":
            old = self.adapters_dir / pending["from"]
            if old.exists() and (not folder.exists() or old.name.lower() == folder.name.lower()):
                os.rename(old, folder)
                _fsync_dir(self.adapters_dir)
            with _transaction(con):
                con.execute("UPDATE adapters SET state = 'ready', pending = NULL WHERE id = ?", (row["id"],))
        else:
            raise StudioError(f"{self.db_path}: adapter {row['name']!r} is in an unknown state {row['state']!r}")
        if trash is not None:
            _remove_path(trash)

    # -- reads ---------------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        folder = self.adapters_dir / row["name"]
        return AdapterRecord(
            name=row["name"], path=folder, file=folder / row["file"], method=row["method"], kind=row["kind"],
            family=row["family"], base=row["base"], base_hash=row["base_hash"], triggers=_json(row["triggers"], []),
            description=row["description"], train_config=_json(row["train_config"], {}),
            samples=[folder / s for s in _json(row["samples"], [])], created=row["created"],
            file_hash=row["file_hash"],
        )

    @_db_errors
    def list(self) -> list[AdapterRecord]:
        """Every adapter, by name."""
        with self._reading() as con:
            if con is None:
                return []
            rows = con.execute("SELECT * FROM adapters WHERE state = 'ready' ORDER BY name COLLATE NOCASE")
            return [self._record(r) for r in rows.fetchall()]

    def names(self) -> list[str]:
        """The adapters' names."""
        return [r.name for r in self.list()]

    def _unknown(self, name: str, names: list[str] | None = None) -> StudioError:
        names = self.names() if names is None else names
        if not names:
            return StudioError(f"no adapter named {name!r}: the library ({self.home}) is empty; "
                               f"add one with `studio library add PATH`")
        near = close_matches(str(name), names)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; {len(names)} adapters in it: `studio library list`"
        return StudioError(f"no adapter named {name!r} in the library ({self.home}){hint}")

    def _read_row(self, name: str) -> sqlite3.Row:
        """The ready row named ``name``, read without the lock; unknown names raise with close matches."""
        with self._reading() as con:
            row = None if con is None else con.execute(
                "SELECT * FROM adapters WHERE name = ? AND state = 'ready'", (str(name),)).fetchone()
        if row is None:
            raise self._unknown(name)
        return row

    @_db_errors
    def get(self, name: str) -> AdapterRecord:
        """The adapter named ``name`` (any case); a StudioError with close matches when there is none."""
        record = self._record(self._read_row(name))
        if not record.file.is_file():
            raise StudioError(f"library adapter {record.name!r}: its file {record.file} is missing (deleted by hand?); "
                              f"remove the entry with `studio library remove {record.name}` and add the adapter again")
        return record

    def find(self, query: str = "") -> list[AdapterRecord]:
        """Adapters whose name, trigger words or description contain ``query`` (case-insensitive)."""
        q = query.strip().lower()
        return [r for r in self.list()
                if not q or q in r.name.lower() or any(q in t.lower() for t in r.triggers) or q in r.description.lower()]

    # -- writes --------------------------------------------------------------------------------
    def _free_name(self, con: sqlite3.Connection, name: str) -> str:
        """``name``, else ``name-2``, ``name-3``... : the first that neither a row nor a folder holds."""
        n = 1
        candidate = name
        while (con.execute("SELECT 1 FROM adapters WHERE name = ?", (candidate,)).fetchone()
               or (self.adapters_dir / candidate).exists()):
            n += 1
            suffix = f"-{n}"
            candidate = name[:80 - len(suffix)] + suffix
        return candidate

    def _same_file(self, con: sqlite3.Connection, file_hash: str, but: str) -> str | None:
        row = con.execute("SELECT name FROM adapters WHERE file_hash = ? AND name != ? AND state = 'ready'",
                          (file_hash, but)).fetchone()
        return row["name"] if row else None

    @_db_errors
    def add(self, path: str | os.PathLike, *, name: str | None = None, description: str = "", replace: bool = False,
            kind: str | None = None, unique: bool = False) -> AdapterRecord:
        """Copy an adapter file or folder into the library, atomically; returns its record.

        ``name``: default from the folder (or file) name. A taken name is an error, unless
        ``replace`` (the new files and metadata take its place) or ``unique`` (``NAME-2``, ``NAME-3``...
        is used instead: check the returned record's name). ``kind``: subject, style, content or
        other (default: what the file says, else other). A training folder's ``samples/*.png`` and
        ``train_config.json`` come along. A folder already under ``<home>/adapters/`` that the
        database does not know (a crash of another tool, a rebuilt database) is registered in place.
        """
        if kind is not None and kind not in KINDS:
            raise StudioError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
        src = _inspect(path)
        wanted = check_name(name) if name else derive_name(src.name_hint)
        kind = kind or (src.info["kind"] if src.info["kind"] in KINDS else "other")
        with self._writing() as con:
            taken = con.execute("SELECT * FROM adapters WHERE name = ?", (wanted,)).fetchone()
            if taken is not None and taken["state"] != "ready":
                raise StudioError(f"library adapter {taken['name']!r}: an earlier change to it could not be finished "
                                  f"(see the log); try again")
            if taken is not None and not replace:
                if not unique:
                    same = _sha256(src.file) == taken["file_hash"]
                    raise StudioError(
                        f"{src.file}: " + (f"already in the library as {taken['name']!r}" if same else
                                           f"the name {taken['name']!r} is taken in the library") +
                        "; choose another with --name, or pass --replace to overwrite it")
                wanted, taken = self._free_name(con, wanted), None
            folder = self.adapters_dir / wanted
            if taken is None and folder.exists():
                if src.folder is not None and src.folder.resolve() == folder.resolve():
                    return self._adopt(con, src, wanted, description, kind)
                if not unique:
                    raise StudioError(f"{folder} exists but is not in the library (left by another tool?); register "
                                      f"it with `studio library add {folder}`, or move it away")
                wanted = self._free_name(con, wanted)
            if taken is not None:
                wanted = taken["name"]
            return self._add_copy(con, src, wanted, description, kind, taken)

    def _add_copy(self, con: sqlite3.Connection, src: _Source, name: str, description: str, kind: str,
                  taken: sqlite3.Row | None) -> AdapterRecord:
        staging_name, trash_name = f"add-{uuid.uuid4().hex}", f"trash-{uuid.uuid4().hex}"
        staging = self.tmp_dir / staging_name
        try:
            staging.mkdir()
            file_name = src.file.name if src.folder is not None else derive_name(src.file.stem) + ".safetensors"
            file_hash = _copy(src.file, staging / file_name, hashed=True)
            samples = []
            for p in _samples_of(src.folder):
                (staging / "samples").mkdir(exist_ok=True)
                _copy(p, staging / "samples" / p.name)
                samples.append(f"samples/{p.name}")
            for extra in EXTRA_FILES:
                if src.folder is not None and (src.folder / extra).is_file() and extra != file_name:
                    _copy(src.folder / extra, staging / extra)
            values = src.columns(kind, description, src.created or time.time())
            _write_record_file(staging, file_name, values)
            _fsync_dir(staging)
            _checkpoint("staged")
        except OSError as exc:
            _remove_path(staging)
            raise StudioError(f"{src.file}: could not copy it into the library at {self.home} "
                              f"({exc.strerror or exc})") from exc
        except BaseException:
            _remove_path(staging)
            raise
        twin = self._same_file(con, file_hash, name)
        if twin:
            log.info("%s has the same weights as library adapter %r", src.file, twin)
        values.update(file=file_name, samples=json.dumps(samples), file_hash=file_hash, embedding=None,
                      state="adding", pending=json.dumps({"staging": staging_name, "trash": trash_name}))
        with _transaction(con):  # the commit point: from here on the add completes, even after a crash
            if taken is None:
                _insert(con, name, values)
            else:
                con.execute(f"UPDATE adapters SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                            [*values.values(), taken["id"]])
        _checkpoint("committed")
        row = con.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        self._finish(con, row)
        record = self._record(con.execute("SELECT * FROM adapters WHERE id = ?", (row["id"],)).fetchone())
        log.info("%s %s as %r (%s, %s, %s)", "replaced" if taken is not None else "added", src.file, record.name,
                 record.method, record.kind, record.family or "family unknown")
        return record

    def _adopt(self, con: sqlite3.Connection, src: _Source, name: str, description: str,
               kind: str) -> AdapterRecord:
        """Register a folder that already sits at ``adapters/<name>/``: one transaction, no copy."""
        folder = self.adapters_dir / name
        values = src.columns(kind, description, src.created or time.time())
        if not (folder / RECORD_FILE).is_file():
            _write_record_file(folder, src.file.name, values)
        values.update(file=src.file.name, samples=json.dumps([str(p.relative_to(folder)) for p in _samples_of(folder)]),
                      file_hash=_sha256(src.file))
        with _transaction(con):
            _insert(con, name, values)
        log.info("registered %s in place as %r", folder, name)
        return self._record(con.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone())

    def _ready_row(self, con: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM adapters WHERE name = ? AND state = 'ready'", (str(name),)).fetchone()
        if row is None:
            names = [r["name"] for r in con.execute("SELECT name FROM adapters WHERE state = 'ready'").fetchall()]
            raise self._unknown(name, names)
        return row

    @_db_errors
    def rename(self, old: str, new: str) -> AdapterRecord:
        """Give an adapter another name (its folder moves with it)."""
        check_name(new)
        with self._writing() as con:
            row = self._ready_row(con, old)
            if new == row["name"]:
                return self._record(row)
            other = con.execute("SELECT name FROM adapters WHERE name = ? AND id != ?", (new, row["id"])).fetchone()
            if other is not None:
                raise StudioError(f"cannot rename {row['name']!r} to {new!r}: the library already has an adapter named "
                                  f"{other['name']!r}; remove it first or choose another name")
            if (self.adapters_dir / new).exists() and new.lower() != row["name"].lower():
                raise StudioError(f"cannot rename {row['name']!r} to {new!r}: {self.adapters_dir / new} exists but is "
                                  f"not in the library; move it away first")
            with _transaction(con):
                con.execute("UPDATE adapters SET name = ?, state = 'renaming', pending = ? WHERE id = ?",
                            (new, json.dumps({"from": row["name"]}), row["id"]))
            _checkpoint("rename-committed")
            self._finish(con, con.execute("SELECT * FROM adapters WHERE id = ?", (row["id"],)).fetchone())
            log.info("renamed %r to %r", row["name"], new)
            return self._record(con.execute("SELECT * FROM adapters WHERE id = ?", (row["id"],)).fetchone())

    @_db_errors
    def remove(self, name: str) -> None:
        """Delete an adapter: its row and its folder."""
        with self._writing() as con:
            row = self._ready_row(con, name)
            with _transaction(con):
                con.execute("UPDATE adapters SET state = 'removing', pending = ? WHERE id = ?",
                            (json.dumps({"trash": f"trash-{uuid.uuid4().hex}"}), row["id"]))
            _checkpoint("remove-committed")
            self._finish(con, con.execute("SELECT * FROM adapters WHERE id = ?", (row["id"],)).fetchone())
            log.info("removed %r", row["name"])

    def import_dir(self, folder: str | os.PathLike, *,
                   skipped: list[tuple[Path, str]] | None = None) -> list[AdapterRecord]:
        """Add every adapter file or folder found in ``folder`` (recursively); returns the added ones.

        What is not added (already in the library, not an adapter, a taken name, pickled weights...)
        is logged as a warning and, when ``skipped`` is given, appended to it as (path, reason).
        """
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise StudioError(f"{root}: not a folder; `studio library import` takes a folder of adapters "
                              f"(use `studio library add` for one file)")
        candidates, skips = _scan(root)
        known = {r.file_hash: r.name for r in self.list()}
        added: list[AdapterRecord] = []
        for path in candidates:
            try:
                file, _ = _locate(path)
                digest = _sha256(file)
                if digest in known:
                    skips.append((path, f"already in the library as {known[digest]!r}"))
                    continue
                record = self.add(path)
            except StudioError as exc:
                skips.append((path, str(exc).removeprefix(f"{path}: ")))
                continue
            except OSError as exc:
                skips.append((path, f"unreadable ({exc.strerror or exc})"))
                continue
            known[record.file_hash] = record.name
            added.append(record)
        for path, reason in skips:
            log.warning("skipped %s: %s", path, reason)
        if skipped is not None:
            skipped.extend(skips)
        log.info("imported %d adapter(s) from %s, skipped %d", len(added), root, len(skips))
        return added

    # -- retrieval embeddings (AutoLoRA) ----------------------------------------------------------
    @_db_errors
    def set_embedding(self, name: str, vector: Any, source: str = "") -> None:
        """Store an adapter's retrieval vector (1-D, finite; kept as float32) and what made it (``source``: the
        encoder's id, so a vector of another encoder is recognised as stale). ``None`` clears it."""
        import numpy as np

        blob = None
        if vector is not None:
            arr = np.asarray(vector)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
                raise StudioError(f"embedding of {name!r}: expected a non-empty 1-D numeric vector, got shape "
                                  f"{arr.shape} of {arr.dtype}")
            arr = arr.astype(np.float32)
            if not np.isfinite(arr).all():
                raise StudioError(f"embedding of {name!r}: has NaN or infinite values")
            buf = io.BytesIO()
            if source:  # .npz: the vector and its source; plain .npy (no source) is what older versions wrote
                np.savez(buf, vector=arr, source=np.array(source))
            else:
                np.save(buf, arr, allow_pickle=False)
            blob = buf.getvalue()
        with self._writing() as con:
            row = self._ready_row(con, name)
            with _transaction(con):
                con.execute("UPDATE adapters SET embedding = ? WHERE id = ?", (blob, row["id"]))

    @_db_errors
    def embedding(self, name: str) -> Any:
        """An adapter's retrieval vector (float32 numpy array), or None when it has none yet."""
        return self.embedding_with_source(name)[0]

    @_db_errors
    def embedding_with_source(self, name: str) -> tuple[Any, str]:
        """(vector or None, the id of the encoder that made it; "" when unknown)."""
        import numpy as np

        row = self._read_row(name)
        if row["embedding"] is None:
            return None, ""
        loaded = np.load(io.BytesIO(row["embedding"]), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, ""
        with loaded:
            return loaded["vector"], str(loaded["source"])


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _insert(con: sqlite3.Connection, name: str, values: dict[str, Any]) -> None:
    cols = ["name", *values]
    con.execute(f"INSERT INTO adapters ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [name, *values.values()])


def _write_record_file(folder: Path, file: str, columns: dict[str, Any]) -> None:
    """The user's fields beside the weights, written whole (temporary name, fsync, rename)."""
    tmp = folder / f".{RECORD_FILE}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"file": file, "kind": columns["kind"], "description": columns["description"],
                   "triggers": json.loads(columns["triggers"]), "created": columns["created"]}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / RECORD_FILE)


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # best effort: what stays is deleted by the next recovery
            p.unlink()


def _is_adapter_folder(folder: Path) -> bool:
    from studio.adapters.core import LORA_FILE, STUDIO_FILE
    from studio.formats.kohya import PEFT_WEIGHT_NAME

    return any((folder / n).is_file() for n in (LORA_FILE, STUDIO_FILE, PEFT_WEIGHT_NAME, RECORD_FILE))


def _scan(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Adapter folders and .safetensors files under ``root``; pickled weight files as skipped."""
    if _is_adapter_folder(root):
        return [root], []
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith(".") or _is_adapter_folder(here / d):
                dirnames.remove(d)  # hidden folders are not ours; an adapter folder is taken whole
                if not d.startswith("."):
                    found.append(here / d)
        dirnames.sort()
        for fn in sorted(filenames):
            p = here / fn
            if fn.startswith("."):
                continue
            if p.suffix.lower() == ".safetensors":
                found.append(p)
            elif p.suffix.lower() in PICKLE_SUFFIXES:
                skipped.append((p, "pickled weights can run code when loaded; convert to .safetensors first"))
    return sorted(found), skipped


# ----------------------------------------------------------------------------------------------
# for the loaders and the mixer
# ----------------------------------------------------------------------------------------------


def resolve_adapter(spec: str | os.PathLike, home: Path | None = None) -> Path:
    """An existing file or folder path as is, else the file of the library adapter named ``spec``."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    text = str(spec)
    if NAME_PATTERN.match(text):
        lib = Library(home)
        names = lib.names()
        if any(n.lower() == text.lower() for n in names):
            return lib.get(text).file
        near = close_matches(text, names)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise StudioError(f"adapter {text!r}: no such file or folder, and no adapter of that name in the library "
                          f"({lib.home}){hint}")
    raise StudioError(f"adapter {text!r}: no such file or folder")


def check_family(record_or_path: AdapterRecord | str | os.PathLike, pipe: Any) -> None:
    """Refuse an adapter made for another base-model family than ``pipe``'s (StudioError naming both).

    ``record_or_path``: a library record, an adapter file or folder, or a library name. An adapter
    that does not say its family passes (with a note in the log).
    """
    if isinstance(record_or_path, AdapterRecord):
        label, family = record_or_path.name, record_or_path.family
    else:
        path = resolve_adapter(record_or_path)
        label = str(record_or_path)
        family = adapter_family(path)
    src = getattr(pipe, "studio_source", None)
    if src is not None:
        base_family, base = src.family, src.spec
    else:
        from studio.loading import detect_family

        base_family, base = detect_family(pipe), type(pipe).__name__
    if not family:
        log.info("adapter %r does not say which model family it was made for; trying it on %s (%s)", label, base,
                 base_family)
        return
    if family != base_family:
        raise StudioError(f"adapter {label!r} was made for {family} models, but the base model {base} is "
                          f"{base_family}; choose a {family} base model, or an adapter made for {base_family}")


def format_time(created: float) -> str:
    """A record's creation time as local 'YYYY-MM-DD HH:MM'."""
    return datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M")


__all__ = [
    "AdapterRecord", "KINDS", "Library", "adapter_family", "check_family", "check_name", "close_matches",
    "derive_name", "format_time", "resolve_adapter",
]
