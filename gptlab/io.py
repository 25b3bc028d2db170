"""Files in and out: atomic writes, strict JSON, the checks of an output path, and the readers
of JSON Lines, Parquet and directories of their shards.

Atomic writes: a reader sees the old file or the new one, never half of one.

A write goes to a file in a hidden temporary directory beside its target
(`.NAME.<random>.tmp/`, a name unique to the writer), then is renamed over the target. The
writer holds an advisory lock (flock) on its temporary directory while it writes; a write killed
midway (SIGKILL, a power cut) leaves it unlocked, and the next write of the same target removes
it. A temporary whose writer is alive is locked and left alone, so two processes writing the
same place never remove each other's. Where there is no flock (Windows, a file system that
refuses it), writes go unlocked and a killed write's temporary stays. The new file's bytes are
flushed to the disk before the rename and the rename after it (fsync): without that, a power cut
soon after can leave the new name on an empty or partial file.

Directories (a checkpoint, a model saved again and again) are written the same way, whole, then
renamed into place or, over an old one, swapped in by `replace_dir`, with no moment without one of
the two (Linux's renameat2 exchange; elsewhere two renames). `remove_dir` renames a directory aside
to a hidden temporary before removing it, so a kill midway leaves no directory holding part of its
files; one that cannot be renamed (a file in it open on Windows, a mount point) is left whole, with
a warning.

Writing over files of an existing directory (an export, a world, a tokenizer written again)
goes through `old_files_aside`: the old files are renamed into a hidden `.old-files.<random>/`
inside the directory (with a `held.json` saying what was moved from where, and which names the
write writes), deleted once the write is done, and put back, byte for byte, if it fails. What a
killed write left there is settled by the next such write to the directory
(`settle_old_files`): a write killed before it was done is undone (its files removed, the old
ones put back), one killed after it was done has its old files removed.

Strict JSON (`strict_json`): JSON has no NaN or Infinity, and Python's json writes them as bare
tokens other readers refuse. A record a computation wrote (metrics.jsonl, run.json, a model's
config.json, report.json) gets null for each, named in its `non_finite` field, which
`restore_non_finite` turns back into the float; any other file is refused, naming file, line and
field, before anything is written.

Output paths: `check_file_out` / `check_dir_out`, `check_not_input` (not an input file),
`check_not_inside` (not inside an input model) and `check_out_of_read_dirs` (not inside a
directory an input is read from, whose next reading would take the output for input).

Reading: `utf8_lines` reads a text's lines, each ending at \\n, \\r\\n or a lone \\r (Python's
universal newlines: a classic Mac OS file's) or, for JSON Lines, at \\n or \\r\\n only (a lone \\r
inside a record is JSON's white space between values). `json_objects` and `read_jsonl` read JSON
Lines, or a `.parquet` file's rows numbered as lines, each error naming file, line and field;
`read_jsonl` reads a directory as one file, its `.jsonl` and `.parquet` shards in sorted order
(`files_in`), each row carrying its shard in `_file` for an error to name (`record_file`).
`files_in` leaves out hidden files and folders and those in folders whose name begins with "__"
(`__pycache__/`), as `datasets` does, and refuses a directory whose files would not be the data it
holds: a compressed file among them, the files of two splits as `datasets` names them
(`train.jsonl` beside `test.jsonl`), a Hugging Face Hub cache folder holding two revisions of a
dataset; `check_one_split_given` refuses two splits' files given one by one. A compressed file, a
zip archive, Apache Arrow (a `datasets` cache file), Parquet or UTF-16 text (with a byte-order
mark or, read as text, without one) read as text is refused as what it is, with the fix
(`other_format`).
"""
from __future__ import annotations

import difflib
import errno
import glob
import json
import math
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are then left in place
    fcntl = None  # type: ignore[assignment]

from gptlab.errors import NotFound, UserError, WrongKind, kind_of


def _file_under(path: Path) -> Path | None:
    """The first ancestor of `path` that exists and is not a directory, if any."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def check_dir_out(path: str | Path, field: str | None = None) -> Path:
    """`path` as a Path if a directory can be made there (nothing is created), else a
    UserError naming it (and `field`): it is a file, or a file stands where a parent directory
    should."""
    path = not_empty(path, field)
    if path.exists() and not path.is_dir():
        raise UserError("is a file, not a directory", path=path, field=field)
    blocker = _file_under(path)
    if blocker is not None:
        raise UserError(f"parent is a file: {blocker} is not a directory", path=path,
                        field=field)
    return path


def not_empty(path: str | Path, field: str | None) -> Path:
    """`path` as a Path, unless it is the empty string: Path("") is the current directory,
    which a run, a model or a world would then fill without having been named."""
    if not str(path).strip():
        raise UserError("is empty; give a path (write . for the current directory)",
                        field=field)
    return Path(path)


def check_holds_none(out: str | Path, names: tuple[str, ...], field: str = "out") -> None:
    """Refuse a directory `out` that already holds any of `names` (a model's or a run's files):
    writing there would mix its files with another model's."""
    held = [name for name in names if (Path(out) / name).exists()]
    if held:
        listed = held[0] if len(held) == 1 else ", ".join(held[:-1]) + " and " + held[-1]
        raise UserError(f"already holds {listed}; choose another out (--out) or remove it",
                        path=out, field=field)


def missing_dirs(path: str | Path) -> list[Path]:
    """`path` and those of its parent directories that are not there, deepest first: what a
    write that makes `path` (with its parents) makes, and removes if it fails."""
    missing = []
    for p in (Path(path), *Path(path).parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def remove_empty_dirs(dirs: Sequence[Path]) -> None:
    """Remove each of `dirs` (deepest first, as `missing_dirs` lists them) while it is an
    empty directory: what a failed write made, and nothing a user put there since."""
    for d in dirs:
        if not (d.is_dir() and not d.is_symlink()) or any(d.iterdir()):
            return
        d.rmdir()


def ensure_dir(path: str | Path) -> Path:
    """Create directory `path` (and its parents) after `check_dir_out`."""
    path = check_dir_out(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_file_out(path: str | Path) -> Path:
    """`path` as a Path if a file can be written there (nothing is created), else a UserError
    naming it: it is a directory, or a file stands where a parent directory should."""
    path = not_empty(path, "out")
    if path.is_dir():
        raise UserError("is a directory; give a file name", path=path)
    blocker = _file_under(path)
    if blocker is not None:
        raise UserError(f"parent is a file: {blocker} is not a directory", path=path)
    return path


def check_not_input(out: str | Path, inputs: dict[str, str | Path]) -> None:
    """Refuse an output file that is one of the inputs (flag -> path): it would be replaced."""
    for flag, given in inputs.items():
        if Path(given).exists() and Path(out).resolve() == Path(given).resolve():
            raise UserError(f"is the input file ({flag}); writing would replace it, choose "
                            f"another out (--out)", path=out, field="out")


def check_out_of_read_dirs(out: str | Path, inputs: dict[str, Any], what: str,
                           writes: str = "the run's own files") -> None:
    """Refuse an output that is, or lies inside, an input directory read whole (a corpus
    directory, a directory of shards: every file of a kind under it is read): what is written
    there (`writes`: a run's metrics.jsonl, samples) would be read as part of `what` ("corpus",
    "prompts") by a resume or the next run. `inputs`: how a message names each input
    ("data, --data"; "--in") -> its path, a list of paths, or None (not given)."""
    where = Path(out).resolve()
    for named, given in inputs.items():
        paths = [] if given is None else [given] if isinstance(given, (str, Path)) else given
        for path in paths:
            if not str(path).strip() or not Path(path).is_dir():  # "": the caller's to refuse
                continue
            d = Path(path).resolve()
            if d == where:
                why = f"is the {what} directory ({named})"
            elif d in where.parents:
                why = f"is inside the {what} directory {path} ({named})"
            else:
                continue
            raise UserError(f"{why}; {writes} would become part of the {what}; choose another "
                            f"out (--out)", path=out, field="out")


def check_not_inside(out: str | Path, dirs: dict[str, str | Path]) -> None:
    """Refuse an output that is or lies inside one of the input directories (flag -> path): a
    model directory's files would be replaced, or mixed with files that are not the model's."""
    where = Path(out).resolve()
    for flag, given in dirs.items():
        d = Path(given).resolve()
        if Path(given).is_dir() and (where == d or d in where.parents):
            raise UserError(f"is inside the input {given} ({flag}); writing there could replace "
                            f"its files, choose another out (--out)", path=out, field="out")


@contextmanager
def held_temp(make: Callable[[], str]) -> Iterator[Path]:
    """The new temporary file or directory that `make()` creates (with a name no other writer
    has) and returns, locked for this writer until the context ends: `remove_stale_temps` then
    leaves it alone."""
    if fcntl is None:  # Windows: nothing to lock with (nor can a directory be opened there)
        yield Path(make())
        return
    while True:
        tmp = make()
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:  # another writer removed it as stale before we opened it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            # A file system without flock (ENOLCK, EOPNOTSUPP; NFS refuses it on a file open
            # read-only): write unlocked. `remove_stale_temps` cannot lock it either, and so
            # never removes it; a killed write's temporary is then left in place.
            break
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # another writer removed it as stale before the lock was ours: again
    try:
        yield Path(tmp)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | Path, pattern: str) -> list[Path]:
    """Remove the temporaries in `directory` matching the glob `pattern` that no writer holds
    (see `held_temp`): those left by a write that was killed. Returns what was removed."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    for stale in Path(directory).glob(pattern):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its writer is alive
            os.close(fd)
            continue
        try:  # removed while locked: a writer that made it meanwhile sees it gone, makes another
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
        finally:
            os.close(fd)
    return removed



# The hidden directory inside an output directory that a write's old files wait in, and the
# file in it naming them.
OLD_FILES_PREFIX = ".old-files."
HELD_JSON = "held.json"


def _there(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _undo(directory: Path, writes: Sequence[str], held: Sequence[str], aside: Path | None,
          moved: Sequence[str]) -> None:
    """Remove what a write wrote under `writes` in `directory`, in that order, then put back
    the old files `moved` into `aside`, the last moved first; an old file `held` that was not
    moved yet is still in place, and stays."""
    for name in writes:
        if name in moved or name not in held:
            _remove(directory / name)
    for name in reversed(moved):
        os.replace(aside / name, directory / name)


@contextmanager
def _removed_if_failed(made: Sequence[Path]) -> Iterator[None]:
    """Remove the directories `made` (`missing_dirs`), where empty, if the body fails."""
    try:
        yield
    except BaseException:
        remove_empty_dirs(made)
        raise


@contextmanager
def old_files_aside(directory: str | Path, writes: Sequence[str],
                    made: bool | Sequence[Path] = False, dirs: Sequence[str] = ()
                    ) -> Iterator[list[str]]:
    """Write files (or directories, those named in `dirs`) named `writes` in `directory`
    without losing the old ones if the write, the body of this context, fails. Those there
    are renamed, in the order of `writes`, into a hidden `.old-files.<random>/` inside
    `directory` (held by this writer, as `held_temp` holds a temporary), whose `held.json`
    says what was moved from where; once the body is done they are deleted. If it fails, each
    of `writes` is removed and the old ones moved back, the last moved first: `directory` is
    as it was, byte for byte, and removed if the caller `made` it and it is empty (`made`: the
    directories it made, `missing_dirs(directory)` before; True: `directory`). Yields the
    names moved aside. What killed writes left in `directory` is settled first
    (`settle_old_files`). A directory where a file is written (a user's folder named
    `config.json`) is refused before anything moves: a done write deletes what it moved
    aside, and that would be no old copy of the file."""
    directory = Path(directory)
    if HELD_JSON in writes:
        raise ValueError(f"{HELD_JSON} is the name of the list of old files")
    settle_old_files(directory)
    for name in writes:
        path = directory / name
        if name not in dirs and path.is_dir() and not path.is_symlink():
            raise UserError(f"is a directory where a file {name} is written; move it or "
                            "choose another out", path=path)
    held = [name for name in writes if _there(directory / name)]
    with ExitStack() as stack:
        aside = None
        if held:
            aside = stack.enter_context(held_temp(
                lambda: tempfile.mkdtemp(prefix=OLD_FILES_PREFIX, dir=directory)))
        moved: list[str] = []
        try:
            if aside is not None:
                # Written before anything moves: a leftover with it is a write not done.
                write_json_atomic(aside / HELD_JSON, {"from": str(directory.resolve()),
                                                      "moved": held, "writes": list(writes)})
                for name in held:
                    os.replace(directory / name, aside / name)
                    moved.append(name)
                fsync_path(directory)
            yield held
        except BaseException:
            _undo(directory, writes, held, aside, moved)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            remove_empty_dirs([directory] if made is True else made or [])
            raise
        if aside is not None:
            (aside / HELD_JSON).unlink()  # done: a leftover without it is only removed
            shutil.rmtree(aside, ignore_errors=True)


def settle_old_files(directory: str | Path) -> list[Path]:
    """Settle the `.old-files.*` directories that writes killed in `directory` left
    (`old_files_aside`): one with its `held.json` is a write killed before it was done, which
    is undone (each name it writes removed, the old files put back); one without it is a write
    killed once done, or before it moved anything, and is removed. One whose writer is alive
    (locked) is left alone; where there is no flock (Windows), every one is, for the user to
    look at. Returns the leftovers undone, each said on stderr."""
    undone: list[Path] = []
    if fcntl is None:
        return undone
    for aside in sorted(Path(directory).glob(glob.escape(OLD_FILES_PREFIX) + "*")):
        if aside.is_symlink() or not aside.is_dir():
            continue
        try:
            fd = os.open(aside, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its writer is alive
                continue
            if _there(aside / HELD_JSON):
                held = read_json(aside / HELD_JSON)
                writes, moved = held.get("writes"), held.get("moved")
                if not (isinstance(writes, list) and isinstance(moved, list) and all(
                        isinstance(n, str) and n and Path(n).name == n
                        and n not in ("..", HELD_JSON) for n in writes + moved)):
                    raise UserError("is no list of old files a write moved aside; put them "
                                    "back by hand, then remove the directory", path=aside)
                back = [name for name in moved if _there(aside / name)]
                _undo(Path(directory), writes, moved, aside, back)
                undone.append(aside)
                print(f"note: {directory}: a write killed before it was done was undone" +
                      (f": its old {', '.join(back)} put back from {aside.name}" if back else ""),
                      file=sys.stderr)
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            os.close(fd)
    return undone


def fsync_path(path: str | Path) -> None:
    """Flush a file's bytes, or a directory's entries (a rename made in it), to the disk. Skipped
    where the system cannot: Windows opens no directory, and some file systems refuse an fsync."""
    is_dir = os.path.isdir(path)
    try:
        # A file is opened for writing: Windows flushes no handle opened read-only (EBADF).
        fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)
    except PermissionError:
        if is_dir:
            return
        fd = os.open(path, os.O_RDONLY)  # a read-only file: flushed where the system can
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EBADF, errno.EINVAL, errno.EOPNOTSUPP,
                           errno.ENOTSUP):  # macOS's is another number; EIO: data was lost
            raise
    finally:
        os.close(fd)


def replace_dir(new: Path, old: Path) -> None:
    """Put directory `new` where directory `old` is, with no moment at which neither is there:
    Linux swaps the two names in one step (renameat2's RENAME_EXCHANGE), then the old copy,
    now under `new`'s name, is removed. Where that is missing (another system, a file system
    without it) the old copy is renamed aside (`old_files_aside`: into `.old-files.<random>/`
    beside it), then `new` into its place, then the old copy removed: neither is there only
    between two renames (not for as long as a removal takes); a failed second rename puts the
    old copy back, and so does the next write beside it (`settle_old_files`) after a kill
    between the two."""
    if _exchange(new, old):
        fsync_path(old.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    with old_files_aside(old.parent, [old.name], dirs=[old.name]):
        os.replace(new, old)
        fsync_path(old.parent)


def remove_dir(path: Path) -> bool:
    """Remove directory `path` in one step a reader can see: renamed to a hidden temporary beside
    it (`.NAME.<random>.tmp`, unheld), then removed. Killed while removing, it leaves that
    temporary, which the next write of `NAME` removes as stale, never a `NAME` holding part of
    its files (a checkpoint whose manifest outlived its weights, taken for a whole one).
    Where it cannot be renamed (Windows, while another process has a file in it open; a
    mount point) it is left whole, said on stderr, and False returned: removed where it is,
    file by file, the files that could be removed went and the others stayed."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return True
    except OSError as e:
        print(f"warning: {path} was left in place: it cannot be renamed aside to be removed "
              f"({e.strerror or e})", file=sys.stderr)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a C library without it (glibc < 2.28)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


# The names of the temporaries above (`.NAME.<random>.tmp`, directories): mkdtemp's eight
# characters (`new_temp_dir`) or sixteen hex digits (`remove_dir`'s aside).
TEMP_NAME = re.compile(r"\..+\.(?:[a-z0-9_]{8}|[0-9a-f]{16})\.tmp", re.S)


def new_temp_dir(path: Path) -> str:
    """A new directory `.NAME.<random>.tmp` beside `path` (a name no other writer gets), with
    the permissions a plain mkdir would give it (mkdtemp makes it owner-only)."""
    try:
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # the temporary's name means nothing to the user: name the target
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it.
    The temporary is a file in a held temporary directory (libraries such as safetensors
    replace the file they write, so the lock cannot be on the file); temporaries of `path`
    that killed writes left are removed first."""
    path = check_file_out(path)
    made = missing_dirs(path.parent)  # removed again if the write fails
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, glob.escape(f".{path.name}.") + "*.tmp")
    with _removed_if_failed(made), held_temp(lambda: new_temp_dir(path)) as tmp_dir:
        tmp_path = tmp_dir / "file.tmp"
        try:
            tmp_path.touch()
            yield tmp_path
            # A writer may have replaced the file (with its own mode): give it the permissions
            # a plain open() would.
            os.chmod(tmp_path, 0o666 & ~_umask())
            fsync_path(tmp_path)  # the bytes on the disk before a name points at them
            os.replace(tmp_path, path)
            fsync_path(path.parent)  # and the rename itself
        except Exception as e:
            named = named_os_error(e, path)
            if named is e:
                raise
            raise named from e
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def named_os_error(e: BaseException, path: str | Path) -> BaseException:
    """`e`, a failed write of `path`, as the OSError behind it naming `path`, so that the CLI
    says it in one line (a full disk: exit 2). A failed write() names no file; safetensors and
    tokenizers (Rust) report one as an error of their own ending `(os error 28)`; torch's writer
    as a RuntimeError raised while the OSError of the Python file it wrote to was being
    handled (see `gptlab.checkpoint.torch_save`). Anything else is returned as it is."""
    if isinstance(e, OSError):
        short = _short_write(e, path)
        if short is not None:
            return short
        return e if e.filename is not None else OSError(e.errno, e.strerror, str(path))
    if isinstance(e, UserError):
        return e
    if type(e) is RuntimeError and isinstance(e.__context__, OSError) and e.__context__.errno:
        return OSError(e.__context__.errno, e.__context__.strerror, str(path))
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found:
        return OSError(int(found[1]), os.strerror(int(found[1])), str(path))
    return e


def _short_write(e: OSError, path: str | Path) -> OSError | None:
    """numpy's `tofile` (the gguf package's writer of tensors) reports a write cut short as an
    OSError without errno, "884736 requested and 394000 written": where the file system of
    `path` has less room left than the bytes not written, that is a full disk, said as
    ENOSPC naming `path`; with room, under a file size limit, EFBIG. None for any other error
    (or room and no limit: the cause is unknown)."""
    found = re.fullmatch(r"(\d+) requested and (\d+) written", str(e)) if e.errno is None \
        else None
    if found is None:
        return None
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < int(found[1]) - int(found[2]):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    # Room enough: under a limit on a file's size (`ulimit -f`), the write stopped at it (the
    # kernel's EFBIG, which numpy does not pass on; `--to hf` says "File too large" itself).
    try:
        import resource
        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # no such limits (Windows)
        limited = False
    return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path)) if limited else None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# The field of a record that names its non-finite numbers, each written as null: JSON has no
# NaN or Infinity, and Python's json writes them as bare tokens that jq, JSON.parse and most
# readers refuse.
NON_FINITE = "non_finite"
_SPELLED = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _pointer_token(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")  # RFC 6901


def _nulled(value: Any, pointer: str, name: str, found: dict[str, tuple[str, str]]) -> Any:
    """`value` with each NaN or infinity inside it null, noted in `found`: its JSON Pointer ->
    ("NaN", "Infinity" or "-Infinity"; its name as errors write a field, `scores[1]`)."""
    if isinstance(value, float) and not math.isfinite(value):
        found[pointer] = (_SPELLED[repr(float(value))], name)
        return None
    if isinstance(value, dict):
        return {k: _nulled(v, f"{pointer}/{_pointer_token(k)}", f"{name}.{k}" if name else str(k),
                           found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(v, f"{pointer}/{i}", f"{name}[{i}]", found) for i, v in enumerate(value)]
    return value


def strict_json(obj: Any, *, non_finite: str = "refuse", path: str | Path | None = None,
                line: int | None = None, **options: Any) -> str:
    """`obj` as JSON text that every JSON reader takes: never the tokens NaN or Infinity.

    A NaN or an infinity inside `obj` is, with non_finite="null" (a record that a computation
    wrote, such as a metrics row or report.json), null, with the record's `non_finite` field
    naming each by its JSON Pointer: {"loss": null, "non_finite": {"/loss": "NaN"}}
    (`restore_non_finite` reads it back). With non_finite="refuse" (data a later stage or
    another tool reads) it is a UserError naming `path`, `line` and the field: the caller
    writes nothing. `options` are json.dumps's (indent, ensure_ascii, default); with
    ensure_ascii=False a lone surrogate is still written as its `\\u` escape, as UTF-8 has none."""
    if non_finite not in ("null", "refuse"):
        raise ValueError(f"non_finite must be 'null' or 'refuse', not {non_finite!r}")
    found: dict[str, tuple[str, str]] = {}
    value = _nulled(obj, "", "", found)
    if found:
        spelled, name = next(iter(found.values()))
        if non_finite == "refuse" or not isinstance(value, dict):
            raise UserError(f"is {spelled}, which JSON has no number for; nothing was written",
                            path=path, line=line, field=name or None)
        earlier = value.get(NON_FINITE)
        value[NON_FINITE] = {**(earlier if isinstance(earlier, dict) else {}),
                             **{pointer: spelled for pointer, (spelled, _) in found.items()}}
    text = json.dumps(value, allow_nan=False, **options)
    # A lone surrogate (a `\ud800` escape read from JSON, carried in an `id`) has no UTF-8:
    # written raw, the file's write failed; as its escape again, it reads back the same.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def restore_non_finite(value: Any) -> Any:
    """A record read back as `strict_json(..., non_finite="null")` was given it: each null its
    `non_finite` field names is the float again (NaN, inf, -inf), and the field is dropped.
    Anything else, an earlier version's file holding bare NaN among them, is returned as it
    is."""
    if not isinstance(value, dict) or not isinstance(value.get(NON_FINITE), dict):
        return value
    for pointer, spelled in value.pop(NON_FINITE).items():
        if spelled not in _SPELLED.values() or not isinstance(pointer, str) \
                or not pointer.startswith("/"):
            continue
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]
        holder: Any = value
        for token in parents:
            holder = _child(holder, token)
        if isinstance(holder, dict) and holder.get(last, 0) is None:
            holder[last] = float(spelled)
        elif isinstance(holder, list) and last.isdecimal() and int(last) < len(holder) \
                and holder[int(last)] is None:
            holder[int(last)] = float(spelled)
    return value


def _child(holder: Any, token: str) -> Any:
    if isinstance(holder, dict):
        return holder.get(token)
    if isinstance(holder, list) and token.isdecimal() and int(token) < len(holder):
        return holder[int(token)]
    return None


def write_json_atomic(path: str | Path, obj: Any, non_finite: str = "refuse") -> None:
    """Write `obj` as indented JSON; a NaN or an infinity in it as `strict_json` says."""
    write_text_atomic(path, strict_json(obj, non_finite=non_finite, path=path, indent=2,
                                        default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Any, non_finite: str = "refuse") -> int:
    """Write one JSON object per line; a NaN or an infinity in a row as `strict_json` says
    (refused: nothing is written)."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(strict_json(row, non_finite=non_finite, path=path, line=n + 1,
                                ensure_ascii=False) + "\n")
            n += 1
    return n


# What a file that is no text starts with: compressed files and archives, whose first bytes
# would be reported as a byte that is not UTF-8 (or, for a zip, read as a line of text). An empty
# zip archive is its end record alone (PK\5\6), an empty bzip2 stream its end-of-stream magic.
_COMPRESSED = (((b"\x1f\x8b",), "gzip-compressed", "decompress it first (gunzip -k {})"),
               ((b"\xfd7zXZ\x00",), "xz-compressed", "decompress it first (unxz -k {})"),
               ((b"\x28\xb5\x2f\xfd",), "zstd-compressed", "decompress it first (unzstd {})"),
               ((b"BZh",), "bzip2-compressed", "decompress it first (bunzip2 -k {})"),
               ((b"PK\x03\x04", b"PK\x05\x06"), "a zip archive",
                "extract its files first (unzip {})"))
PARQUET_MAGIC = b"PAR1"
# Apache Arrow: an IPC file begins with ARROW1 and two bytes of padding, zeros, (and ends with
# ARROW1): the word alone is text's too ("ARROW1 is ..."), the zeros no text's. An IPC stream, as
# `datasets` writes its cache files and save_to_disk's shards, has no magic: it begins with a
# message's continuation marker, four 0xFF bytes, which no UTF-8 text (nor UTF-16's byte-order
# mark, FF FE) begins with.
ARROW_MAGIC = b"ARROW1\x00\x00"
_ARROW_STREAM = b"\xff\xff\xff\xff"


def _arrow(head: bytes, path: str | Path) -> tuple[str, str] | None:
    """(what it is, how to convert it) for file `path` whose first bytes are `head`, if it is
    Apache Arrow (by its first bytes, or a name ending .arrow and a NUL byte in them, as a
    stream of the format before the continuation marker begins with its metadata's length, a
    little-endian int32: text named .arrow, or an empty file, is text); else None. A stream is
    read by `datasets.Dataset.from_file`, an IPC file by pyarrow's `ipc.open_file` alone."""
    name = repr(str(path))
    if head.startswith(ARROW_MAGIC):
        return ("an Apache Arrow file", "convert it to Parquet first: python -c \"import "
                "pyarrow.ipc, pyarrow.parquet as pq; pq.write_table(pyarrow.ipc.open_file("
                f"{name}).read_all(), 'data.parquet')\"")
    if head.startswith(_ARROW_STREAM) or (Path(path).suffix.lower() == ".arrow"
                                           and b"\x00" in head):
        return ("an Apache Arrow stream (as datasets writes its cache files and save_to_disk's "
                "shards)", f"convert it first: datasets.Dataset.from_file({name}).to_json("
                "'data.jsonl') writes JSON Lines, .to_parquet('data.parquet') Parquet")
    return None


def _compression(head: bytes, path: str | Path) -> tuple[str, str] | None:
    """(what it is, how to undo it) for file `path` whose first bytes are `head`, if they are a
    compressed file's or an archive's; else None. The advice names `path` as given (inside a
    directory, joined to it), so that it runs from where the user stands."""
    for magics, kind, advice in _COMPRESSED:
        # bzip2's "BZh" is text too: its block size digit and a block's (or the end's) magic
        # follow it.
        if head.startswith(magics) and (magics != (b"BZh",) or re.match(
                rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)", head)):
            return kind, advice.format(shlex.quote(str(path)))
    return None


# How `datasets` tells a directory's splits by their names (`datasets.data_files.
# get_data_patterns`), which `files_in` follows to refuse a directory of two. The first of three
# rules that some file meets decides, and the others are not looked at:
# 1. a shard right in the directory's `data/` folder: `data/{split}-00000-of-00002.parquet`, five
#    digits each, maybe a fingerprint after (`...-of-00002-5f1e2d3c.parquet`, as `datasets`
#    before 2.15 pushed them), of any split name. Elsewhere a shard's name names no split:
#    `wiki-00000-of-00002.txt` beside `books-00000-of-00001.txt` is one split.
# 2. a split word in a folder's name, at any depth (`train/`, `default/test/`, `dev_set/`);
# 3. a split word in the file's name (`train.jsonl`, `my_test_file.csv`, `validation1.parquet`).
# A split word is a whole part of the name: after its start or a separator (`-._ ` or a digit),
# before a separator or a folder name's end. `contest`, `pretrain` and `TRAIN` name none. A file
# whose name holds two (`train/test/a.jsonl`, `train_test.jsonl`) is in both splits.
# Paths that share only the root are looked at from `/`, but for the system's device folder
# `/dev`, whose name (a validation word) names no split: `/dev/stdin`, or bash's `<(...)` as
# `/dev/fd/63`, beside `train.txt` is no validation split (`/dev/shm/test.txt` is still test's).
_SHARD_IN_DATA = re.compile(r"(.+)-[0-9]{5}-of-[0-9]{5}.*\..*", re.S)
_SPLIT_WORDS = {"train": ("train", "training"),
                "validation": ("validation", "valid", "dev", "val"),
                "test": ("test", "testing", "eval", "evaluation")}
_SEPARATOR = "[-._ 0-9]"
_SPLIT_IN_FOLDER = {split: re.compile(rf"(?:^|{_SEPARATOR})(?:{'|'.join(words)})"
                                      rf"(?:{_SEPARATOR}|$)")
                    for split, words in _SPLIT_WORDS.items()}
_SPLIT_IN_NAME = {split: re.compile(rf"(?:^|{_SEPARATOR})(?:{'|'.join(words)}){_SEPARATOR}")
                  for split, words in _SPLIT_WORDS.items()}


Splits = dict[str, list[tuple[Path, Path | None]]]


def _split_rules(d: Path | None, files: list[Path]) -> list[Splits]:
    """What each of the three rules above makes of directory `d`'s `files`: each split's files,
    with the folder (inside `d`) that names it, None where the file's own name does. `d` None:
    the files share no folder (on two Windows drives), and each is looked at from its own
    root, as files that share only the root are."""
    rels = [(f, f.relative_to(f.anchor if d is None else d)) for f in files]
    shards: Splits = {}
    in_folders: Splits = {}
    in_names: Splits = {}
    for f, rel in rels:
        shard = _SHARD_IN_DATA.fullmatch(rel.name) if rel.parent == Path("data") else None
        if shard:
            shards.setdefault(shard[1], []).append((f, None))
        folders = rel.parts[:-1]
        at_root = d is None or d.parent == d
        system = 1 if at_root and folders[:1] == ("dev",) else 0  # /dev, at the root
        for split, pattern in _SPLIT_IN_FOLDER.items():
            named = [i for i, folder in enumerate(folders)
                     if i >= system and pattern.search(folder)]
            if named:
                in_folders.setdefault(split, []).append((f, Path(*folders[:named[0] + 1])))
        for split, pattern in _SPLIT_IN_NAME.items():
            if pattern.search(rel.name):
                in_names.setdefault(split, []).append((f, None))
    return [shards, in_folders, in_names]


def _splits(d: Path | None, files: list[Path]) -> Splits:
    """The splits of directory `d`'s `files` that a verb would read as one: those `datasets`
    makes by the first rule above that one of them meets ({} where none is: one split of them
    all), and, where that makes one split, the files it leaves out that a later rule names for
    another split. `datasets` leaves `test.jsonl` beside `train/` out of every split; a verb
    reads every file, and would train on it."""
    rules = _split_rules(d, files)
    first = next((i for i, rule in enumerate(rules) if rule), len(rules))
    splits = dict(rules[first]) if first < len(rules) else {}
    if len(splits) == 1:
        taken = {f for f, _ in next(iter(splits.values()))}
        for rule in rules[first + 1:]:
            for split, named in rule.items():
                strays = [(f, folder) for f, folder in named if f not in taken]
                if strays and split not in splits:
                    splits[split] = strays
    return splits


def _check_one_split(d: Path, files: list[Path]) -> None:
    """Refuse directory `d` if its `files` belong to two or more splits (`_splits`): read as
    one, a split held out for evaluation (test.jsonl beside train.jsonl) would be trained on,
    and splits none holds out would be one corpus that `datasets` does not make of them.
    Only the files a verb reads count: a `.csv` beside them, which `datasets` would count too,
    is read by none."""
    splits = _splits(d, files)
    if len(splits) < 2:
        return
    names, a, b = _two_splits_named(splits)
    first = splits[names[0]]
    which = (f"{a.relative_to(d)} is {names[0]}'s, {b.relative_to(d)} {names[1]}'s" if b != a
             else f"{a.relative_to(d)} is {names[0]}'s and {names[1]}'s")
    folders = {folder for _, folder in first}
    if len(folders) == 1 and None not in folders:
        pick = f"give one split's folder instead ({d / folders.pop()})"
    elif len(first) == 1:
        pick = f"give one split's file instead ({a})"
    else:
        pick = (f"move one split's files into a folder of their own and give that (the "
                f"{names[0]} split's {len(first)}, {a.relative_to(d)} ...)")
    raise UserError(f"holds the files of {len(names)} splits ({', '.join(names)}), as datasets "
                    f"names them: {which}; {_read_as_one(names, 'be read with the others')}: "
                    f"{pick}", path=d)


def _read_as_one(names: list[str], would: str) -> str:
    """What is wrong with reading the splits `names` as one: a split held out for evaluation
    (validation, test) would then do what `would` says ("be trained on"); with none held out
    (`data/wiki-00000-of-00001.parquet` beside train.jsonl), they would be one corpus, which
    `datasets` makes of them nowhere (it reads them as splits apart, or leaves a later rule's
    split out)."""
    if {"validation", "test"} & set(names):
        return f"read as one, a split held out for evaluation would {would}"
    return (f"{'neither' if len(names) == 2 else 'none'} is held out for evaluation, but read as "
            f"one, they would be one corpus, which datasets does not make of them")


def _two_splits_named(splits: Splits) -> tuple[list[str], Path, Path]:
    """(the split names, train, validation and test first; a file of the first split; a file of
    the second that is not the first's too, if it has one, else the same) for an error to name."""
    names = ([s for s in _SPLIT_WORDS if s in splits]
             + sorted(s for s in splits if s not in _SPLIT_WORDS))
    a = splits[names[0]][0][0]
    firsts = {f for f, _ in splits[names[0]]}
    b = next((f for f, _ in splits[names[1]] if f not in firsts), a)
    return names, a, b


def check_one_split_given(paths: list[Path], reached: list[tuple[Path, str]],
                          field: str) -> None:
    """Refuse the files of several `paths` read as one (`--data train.txt test.txt`, `--data
    corpus/train corpus/test`) if they belong to two or more splits, named by `_splits` as if
    the paths' deepest common folder had been given: giving a directory's files one by one is
    no way around the refusal of the directory. `reached`: each file the paths read, and how
    the user gave it ("b.txt", "b.txt (in corpus)"), for the message to name."""
    if len(paths) < 2:  # one path: a directory's splits are `files_in`'s to refuse
        return
    # Absolute, not resolved: a link's own name is the one the user sees.
    given = {Path(os.path.abspath(f)): how for f, how in reached}
    splits = _splits(_common_folder([os.path.abspath(p) for p in paths]), list(given))
    if len(splits) < 2:
        return
    names, a, b = _two_splits_named(splits)
    which = (f"{given[a]} is {names[0]}'s, {given[b]} {names[1]}'s" if b != a
             else f"{given[a]} is {names[0]}'s and {names[1]}'s")
    raise UserError(f"gives the files of {len(names)} splits ({', '.join(names)}), as datasets "
                    f"names them: {which}; {_read_as_one(names, 'be trained on')}: give one "
                    f"split's files", field=field)


def _common_folder(paths: list[str]) -> Path | None:
    """The deepest folder the absolute `paths` share, or None where they share none: on
    Windows, paths on two drives (`C:\\train.txt`, `D:\\test.txt`), of which
    `os.path.commonpath` raises ValueError. No file is inside a folder of the other drive's."""
    try:
        return Path(os.path.commonpath(paths))
    except ValueError:
        return None


def files_in(directory: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Every file under `directory` whose suffix is one of `suffixes`, in sorted order: what a
    verb reads of a directory, leaving out hidden files and folders as `datasets` does and
    following linked folders (`_files_under`). A UserError where that would not be the data the
    directory holds: no such file (naming any compressed files it skipped, which no verb
    reads); a link to no file (`b.jsonl` whose target was moved), or a folder that cannot be
    read, whose data would go unread; a compressed file that would be one of them decompressed
    (`a.jsonl.gz`), left out without a word; the files of two splits as `datasets` names them
    (`train.jsonl` beside `test.jsonl`, `train/` beside `test/`,
    `data/train-00000-of-00001.parquet` beside `data/test-00000-of-00001.parquet`: `_splits`),
    a test split read, and trained on, with the other; a Hugging Face Hub cache folder holding
    two revisions of a dataset (`snapshots/REV/`), each read."""
    d = Path(directory)
    under = _files_under(d)
    files = []
    for f in under:
        if f.suffix.lower() in suffixes:
            if not f.exists():
                raise UserError(f"is a link to {os.readlink(f)}, which is not there: its data "
                                f"would go unread; link it to the file again or remove the "
                                f"link", path=f)
            if f.is_file():  # not a pipe, whose reading would wait
                files.append(f)
    if not files:
        raise UserError(f"no {', '.join(suffixes)} files in this directory"
                        + _compressed_note(d, under) + _arrow_note(d, under), path=d)
    left_out = _compressed_under(d, under, lambda f: f.suffix.lower() not in suffixes
                                 and Path(f.stem).suffix.lower() in suffixes)
    if left_out:
        (first, (kind, advice)), n = left_out[0], len(left_out)
        listed = (f"1 compressed file ({first.relative_to(d)}, {kind})" if n == 1 else
                  f"{n} compressed files (the first: {first.relative_to(d)}, {kind})")
        them = "it" if n == 1 else "them"
        others = "" if n == 1 else ", and the others likewise"
        raise UserError(f"holds {listed}, which no verb reads, beside the {', '.join(suffixes)} "
                        f"files it reads: left out, part of the data would go unread; "
                        f"{advice}{others}, or move {them} out of the directory", path=d)
    _check_one_revision(d, files)
    _check_one_split(d, files)
    return files


def files_left_out(directory: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under `directory` that `files_in(directory, suffixes)` does not read though
    they are not hidden (`notes.md`, a `.json` beside `.jsonl` shards), in sorted order: for a
    message naming them, which a user would otherwise not know went unread."""
    return [f for f in _files_under(Path(directory))
            if f.suffix.lower() not in suffixes and f.is_file()]


def _check_one_revision(d: Path, files: list[Path]) -> None:
    """Refuse directory `d` if it is a Hugging Face Hub cache folder (`blobs/`, `refs/`,
    `snapshots/`, as `huggingface_hub` keeps a dataset) whose `files` lie in two or more
    revisions' folders (`snapshots/REV/`): each revision would be read, its records twice."""
    if not all((d / sub).is_dir() for sub in ("blobs", "refs", "snapshots")):
        return
    revisions = sorted({f.relative_to(d).parts[1] for f in files
                        if f.relative_to(d).parts[0] == "snapshots"
                        and len(f.relative_to(d).parts) > 2})
    if len(revisions) < 2:
        return
    try:
        main = (d / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        main = ""
    latest = (f"; refs/main names {d / 'snapshots' / main}" if main in revisions else "")
    raise UserError(f"is a Hugging Face Hub cache folder holding {len(revisions)} revisions of "
                    f"a dataset ({', '.join('snapshots/' + r for r in revisions)}); read as "
                    f"one, its records would be read once per revision: give one revision's "
                    f"folder{latest}", path=d)


def _files_under(d: Path) -> list[Path]:
    """The files under directory `d` (and links to no file), in sorted order, but for those
    `datasets` leaves out of a dataset's directory: hidden ones and those in hidden folders (a
    name beginning with ".": `.ipynb_checkpoints/`, `.git/`, a write's temporary
    `.NAME.<random>.tmp/`) and those in folders whose name begins with "__" (`__pycache__/`).
    A linked folder is followed as a linked file is (a folder of shards linked in from another
    disk is read, not left out without a word), but not into a folder it lies inside (a link
    to `..`, which would go round for ever). A folder that cannot be read is a UserError
    naming it: its files would go unread without a word."""
    def unreadable(e: OSError) -> None:
        raise UserError(f"cannot be read ({e.strerror or e}) to list its files; make it "
                        f"readable or move it out of the directory", path=e.filename) from None

    found = []
    inside = {os.fspath(d): (os.path.realpath(d),)}  # a folder -> the real folders it lies in
    for root, folders, names in os.walk(d, onerror=unreadable, followlinks=True):
        chain = inside.pop(root)
        kept = []
        for name in folders:
            sub = os.path.join(root, name)
            real = os.path.realpath(sub)
            if not name.startswith((".", "__")) and real not in chain:
                inside[sub] = (*chain, real)
                kept.append(name)
        folders[:] = kept
        found += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(found)


def _compressed_under(d: Path, under: list[Path],
                      name_ok: Callable[[Path], bool] = lambda f: True
                      ) -> list[tuple[Path, tuple[str, str]]]:
    """The compressed files of `under` (the files under `d`; of those `name_ok` takes), each
    with what it is and how to decompress it, in sorted order."""
    found = []
    for f in under:
        if name_ok(f) and f.is_file():
            try:
                with open(f, "rb") as fh:
                    kind = _compression(fh.read(10), f)
            except OSError as e:  # no right to read it, say: the user's to fix, named
                raise UserError(f"cannot be read ({e.strerror or e}) to learn whether it is "
                                f"compressed; make it readable or move it out of the directory",
                                path=f) from None
            if kind is not None:
                found.append((f, kind))
    return found


def _compressed_note(d: Path, under: list[Path]) -> str:
    """What a message about directory `d` adds about the compressed files of `under` (the
    files under it): how many, the first, and how to decompress it; "" if there are none."""
    found = _compressed_under(d, under)
    if not found:
        return ""
    (first, (kind, advice)), n = found[0], len(found)
    if n == 1:
        return (f"; it holds 1 compressed file, which no verb reads ({first.relative_to(d)}, "
                f"{kind}): {advice}")
    return (f"; it holds {n} compressed files, which no verb reads (the first: "
            f"{first.relative_to(d)}, {kind}): {advice}, and the others likewise")


def _arrow_note(d: Path, under: list[Path]) -> str:
    """What a message about directory `d` adds about the `.arrow` files of `under` (the files
    under it: `datasets`' save_to_disk writes a dataset so): how many, the first, and how to
    convert the directory; "" if there are none."""
    found = [f for f in under if f.suffix.lower() == ".arrow"]
    if not found:
        return ""
    n = len(found)
    listed = (f"1 Apache Arrow file, which no verb reads ({found[0].relative_to(d)})" if n == 1
              else f"{n} Apache Arrow files, which no verb reads (the first: "
                   f"{found[0].relative_to(d)})")
    return (f"; it holds {listed}: convert a datasets save_to_disk directory with "
            f"datasets.load_from_disk({str(d)!r}).to_json('data.jsonl') (JSON Lines) or "
            f".to_parquet('data.parquet'), one file with datasets.Dataset.from_file(FILE)")


def _utf16_without_bom(head: bytes) -> bool:
    """Whether `head`, a file's first bytes, read as UTF-16 text with no byte-order mark
    (Python's "utf-16-le", `iconv -t UTF-16LE` write none): a zero byte at most places of one
    parity, the high bytes of Latin characters, and at few of the other. UTF-8 text holds a
    zero byte only where it holds a NUL character; read as UTF-8, UTF-16 text passed as text
    with a NUL after each letter, and no blank line ended a document."""
    n = len(head) // 2 * 2
    if n < 4:
        return False
    even, odd = head[0:n:2].count(0), head[1:n:2].count(0)
    return 4 * max(even, odd) >= 3 * (n // 2) and 4 * min(even, odd) <= n // 2


def _utf32_without_bom(head: bytes) -> bool:
    """Whether `head`, a file's first bytes, read as UTF-32 text with no byte-order mark: of each
    4 bytes, three are zero at most places (the high bytes of Latin characters), the fourth
    rarely. Read as UTF-8 it passed as text with three NULs after each letter."""
    n = len(head) // 4 * 4
    if n < 8:
        return False
    zeros = sorted(head[k:n:4].count(0) for k in range(4))
    return 4 * zeros[1] >= 3 * (n // 4) and 4 * zeros[0] <= n // 4


def other_format(path: str | Path, read_as: str = "text") -> str | None:
    """Why file `path` cannot be read as `read_as` ("text" or "Parquet"), said for an error,
    if its first bytes show it to be compressed, a zip archive, Apache Arrow (or its name ends
    .arrow), Parquet (PAR1 at both ends, read as text) or UTF-16 or UTF-32 text (with a
    byte-order mark or, read as text, without); None for anything else (what it should be,
    bytes of no kind known here, or no regular file: a pipe's bytes would be used up)."""
    if not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(512)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 8, 0))
        tail = f.read()
    compressed = _compression(head, path)
    if compressed is not None:
        return f"is {compressed[0]}, not {read_as}; {compressed[1]} and give what it holds"
    arrow = _arrow(head, path)
    if arrow is not None:
        return f"is {arrow[0]}, not {read_as}; {arrow[1]}"
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):  # before UTF-16's
        return ("is UTF-32 text (it starts with a UTF-32 byte-order mark); save the file as "
                "UTF-8")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ("is UTF-16 text (it starts with a UTF-16 byte-order mark, as Windows "
                "PowerShell's > writes it); save the file as UTF-8")
    # Parquet ends with its footer's length (4 bytes, little-endian) and PAR1: in a text that
    # starts and ends with PAR1, those 4 bytes are characters, a length past the file's end.
    if (read_as == "text" and head.startswith(PARQUET_MAGIC) and tail.endswith(PARQUET_MAGIC)
            and size >= 12 and int.from_bytes(tail[:4], "little") <= size - 12):
        return ("is a Parquet file, but only a name ending .parquet is read as Parquet: "
                "rename it to end .parquet")
    if read_as == "text" and _utf32_without_bom(head):
        return ("is UTF-32 text without a byte-order mark (three zero bytes beside each "
                "character of its start); save the file as UTF-8")
    if read_as == "text" and _utf16_without_bom(head):
        return ("is UTF-16 text without a byte-order mark (a zero byte beside each character "
                "of its start); save the file as UTF-8")
    return None


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _lf_ends(chunk: bytes, i: int) -> Iterator[tuple[int, int]]:
    """(end of the text, end of the line end) of each line of `chunk` from `i` ended by \\n."""
    for piece in chunk[i:].split(b"\n")[:-1]:
        i += len(piece)
        yield i, i + 1
        i += 1


def _byte_lines(f: Any, block: int = 1 << 20,
                lone_cr: bool = True) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes without the line end) for each line of binary file `f`, ended as
    Python's universal newlines end one: by \\r\\n, a lone \\r or \\n. Read `block` bytes at a
    time, so a file of lone \\r endings (a classic Mac OS one) is not read whole as one line.
    `lone_cr=False`: as JSON Lines end one, by \\n alone (one \\r before it dropped, a CRLF's); a
    lone \\r stays in the line, where JSON reads it as white space between values."""
    pos = 0  # the offset of the block's first byte
    start = 0  # the offset of the line's first byte
    pending: list[bytes] = []  # the line's bytes in earlier blocks
    after_cr = False  # the last block ended with \r: a \n beginning this one is its CRLF's
    while chunk := f.read(block):
        i = 1 if after_cr and chunk.startswith(b"\n") else 0
        start += i
        # (end of the line's text, end of its line end) in the block; the split is the fast way
        # for a block with no \r at all, as most are
        ends = (((m.start(), m.end()) for m in _LINE_END.finditer(chunk, i))
                if lone_cr and b"\r" in chunk else _lf_ends(chunk, i))
        for text_end, end in ends:
            pending.append(chunk[i:text_end])
            line = b"".join(pending)
            yield start, line if lone_cr or not line.endswith(b"\r") else line[:-1]
            pending, i, start = [], end, pos + end
        after_cr = lone_cr and chunk.endswith(b"\r")
        pending.append(chunk[i:])
        pos += len(chunk)
    if any(pending):  # the last line, with no line end
        yield start, b"".join(pending)


def utf8_lines(path: str | Path, lone_cr: bool = True) -> Iterator[tuple[int, str]]:
    """(line number, line without its line end), failing on the first byte that is not UTF-8.

    A line ends as Python's universal newlines end one: at \\n, \\r\\n or a lone \\r (a classic
    Mac OS file's), and a \\r before a CRLF is a line end of its own ("x\\r\\r\\n" is "x" and an
    empty line), as an editor shows it. `lone_cr=False` (JSON Lines): at \\n or \\r\\n only.
    A UTF-8 byte-order mark at the start of the file is not text and is dropped. A compressed
    file, a zip archive, a Parquet file or UTF-16 text is refused as such (`other_format`), not
    by its first byte that is not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise NotFound("file not found", path=path)
    if path.is_dir():
        raise WrongKind("is a directory, not a file", path=path)
    other = other_format(path)
    if other is not None:
        raise UserError(other, path=path)
    with open(path, "rb") as f:
        for lineno, (offset, raw) in enumerate(_byte_lines(f, lone_cr=lone_cr), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
                                f"{offset + e.start} cannot be decoded; save the file as UTF-8",
                                path=path, line=lineno) from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON does not have; they would come back
    # out as tokens other readers reject.
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    # A number too large for a float (1e999) is read as infinity: refused as Infinity is.
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


class _TooLong(ValueError):
    pass


def _readable_int(text: str) -> int:
    # Python refuses to read an integer of more digits than its limit (4300) with a ValueError
    # that names no file: say which line holds it.
    digits = len(text.lstrip("-"))
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # Python < 3.10.7: no limit
    if limit and digits > limit:
        raise _TooLong(f"an integer of {digits} digits is more than the {limit} digits a number "
                       f"may have here; write it as a string")
    return int(text)


class _RepeatedKey(ValueError):
    pass


# A key written twice in one JSON object, in a JSON Lines record or a JSON file.
GIVEN_TWICE = ("is given twice in one object; JSON readers differ in which value they take "
               "(Python's json the last, others the first or none): keep one")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    # JSON leaves a name given twice in an object to the reader: which value the line meant
    # would be a guess (Python's json silently kept the last).
    obj = dict(pairs)
    if len(obj) != len(pairs):  # some name is given twice: the first to be, named
        keys = [key for key, _ in pairs]
        raise _RepeatedKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return obj


class _Pairs(list):
    """An object's (name, value) pairs as read, repeated names kept."""


_UNREAD = object()  # a number json_objects refuses: NaN, an infinity, an integer too long


def _unread_float(text: str) -> Any:
    return float(text) if math.isfinite(float(text)) else _UNREAD


def _unread_int(text: str) -> Any:
    try:
        return _readable_int(text)
    except _TooLong:
        return _UNREAD


def _refused_field(line: str) -> str | None:
    """The field of JSON text `line` that `json_objects` refused, named as errors name a field
    (`messages[1].content`): the first, in the order json reads them, that is a NaN, an
    infinity or an integer too long, or a name an object gives twice. None if there is none,
    or the line cannot be read so."""
    def find(value: Any, name: str) -> str | None:
        if value is _UNREAD:
            return name or None
        if isinstance(value, (_Pairs, list)):
            # An object is checked once read whole: its values' faults come first.
            items = value if isinstance(value, _Pairs) else enumerate(value)
            for key, v in items:
                found = find(v, f"{name}[{key}]" if not isinstance(value, _Pairs)
                             else f"{name}.{key}" if name else key)
                if found:
                    return found
            if isinstance(value, _Pairs):
                keys = [k for k, _ in value]
                repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
                if repeated is not None:
                    return f"{name}.{repeated}" if name else repeated
        return None
    try:
        return find(json.loads(line, parse_constant=lambda _: _UNREAD,
                               parse_float=_unread_float, parse_int=_unread_int,
                               object_pairs_hook=_Pairs), "")
    except (ValueError, RecursionError):
        return None


def parquet_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row as a dict) for each row of a Parquet file: its columns are the
    fields a JSONL line would have (lists and structs arrive as lists and dicts). A null is an
    absent field, as it is for a JSONL line that lacks it: a file mixing `prompt` rows and
    `messages` rows has both columns, each null where the other is set."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = Path(path)
    if not path.exists():
        raise NotFound("file not found", path=path)
    try:
        file = pq.ParquetFile(path)
        check_unique_columns(path, file.schema_arrow.names)
        batches = file.iter_batches()
        n = 0
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:
                raise not_utf8_row(batch, path, n) from None
            for row in rows:
                n += 1
                yield n, {k: _json_value(v, path, n, k) for k, v in row.items() if v is not None}
    except (pa.ArrowException, OSError) as e:
        raise unreadable_parquet(path, e) from None
    except UnicodeDecodeError:  # the values' are caught above: this is in the file's metadata
        raise UserError(PARQUET_NAMES_NOT_UTF8, path=path) from None


def unreadable_parquet(path: str | Path, e: BaseException) -> UserError:
    """Parquet file `path`, which pyarrow failed to read with `e`, as a UserError saying what
    it holds instead where its first bytes show it (text, a compressed file, nothing), else
    pyarrow's reason in one line."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        return UserError("is empty (0 bytes), not a Parquet file", path=path)
    other = other_format(path, read_as="Parquet")
    if other is not None:
        return UserError(other, path=path)
    begins = _text_start(path)
    if begins is not None:
        return UserError(f"is text, not Parquet (it begins {begins!r}); only a Parquet file is "
                         f"read by a name ending .parquet: name it as what it holds (.jsonl "
                         f"for JSON Lines, .txt for plain text)", path=path)
    return UserError(f"not a readable Parquet file ({' '.join(str(e).split())})", path=path)


def _text_start(path: Path) -> str | None:
    """The first line of file `path` (at most 40 characters) if its first bytes are UTF-8 text
    (no control characters but tabs and line ends) and not Parquet's magic; else None."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(200)
    if head.startswith(PARQUET_MAGIC):
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # only a character cut at byte 200 is text
            return None
        text = head[:e.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    if not text.strip() or any(c < " " and c not in "\t\r\n" for c in text):
        return None
    return text.strip().splitlines()[0][:40]


# A column name that is not UTF-8 comes from a corrupt footer (pyarrow cannot decode it).
PARQUET_NAMES_NOT_UTF8 = ("not a readable Parquet file (a column name in its metadata is not "
                          "UTF-8: is the file corrupt?)")


def check_unique_columns(path: str | Path, names: Sequence[str],
                         read: Iterable[str] | None = None) -> None:
    """Refuse a Parquet file holding a column read (`read`; every one by default) under one name
    twice, as pyarrow writes it: a row as a dict keeps the last, pandas both, a schema lookup
    fails; a JSON Lines object with a key twice is refused so too."""
    for name in (names if read is None else read):
        if names.count(name) > 1:
            raise UserError(f"is a column {names.count(name)} times; readers differ in which one "
                            f"they take (pyarrow's to_pylist the last, pandas all of them): keep "
                            f"one", path=path, field=name)


def parquet_not_utf8(path: str | Path, columns: list[str] | None = None) -> UserError:
    """The first value of a Parquet file (in `columns`) whose text is not UTF-8, as a
    UserError naming its row and column: for a reader that met it without knowing where."""
    import pyarrow.parquet as pq
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=columns):
        try:
            batch.to_pylist()
        except UnicodeDecodeError:
            return not_utf8_row(batch, path, n)
        n += batch.num_rows
    return UserError("not UTF-8 text", path=path)


def not_utf8_row(batch: Any, path: str | Path, rows_before: int) -> UserError:
    """A UserError naming the first row and column of an Arrow batch (or table) that cannot
    be decoded as UTF-8 (Parquet does not check the text it stores)."""
    for i in range(batch.num_rows):
        for name in batch.schema.names:
            try:
                batch.column(name).slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                return UserError(f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at byte offset "
                                 f"{e.start} of the value cannot be decoded; write the text as "
                                 f"UTF-8", path=path, line=rows_before + i + 1, field=name)
    return UserError("not UTF-8 text", path=path)


def _json_value(v: Any, path: Path, row: int, field: str) -> Any:
    """A Parquet value as JSON would hold it: nulls inside structs dropped (absent, as at the
    top level); a NaN, an infinity or a type JSON lacks (dates, decimals, bytes) refused."""
    if isinstance(v, dict):
        return {k: _json_value(x, path, row, f"{field}.{k}") for k, x in v.items()
                if x is not None}
    if isinstance(v, list) and any(isinstance(x, tuple) for x in v):
        # pyarrow gives a map column's value as (key, value) pairs: "a tuple" named no type the
        # user wrote.
        raise UserError("is a Parquet map, which JSON has no type for; store it as a struct "
                        "(an object) or a list", path=path, line=row, field=field)
    if isinstance(v, list):
        return [_json_value(x, path, row, f"{field}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"{v} is not a JSON number; write null or a finite number", path=path,
                        line=row, field=field)
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    raise UserError(f"{kind_of(v)} is not a JSON value; store it as text or a number",
                    path=path, line=row, field=field)


# Comma- and tab-separated values, which `datasets` reads as a table (`load_dataset("csv")`):
# read as JSON Lines, a records file stopped at its header as "not valid JSON", and a corpus was
# trained on its header, commas and quotes as text, without a word.
_CSV_SEPARATORS = {".csv": "", ".tsv": ", sep='\\t'"}


def csv_refused(path: str | Path) -> UserError | None:
    """The error for file `path` if its name ends `.csv` or `.tsv`, with the command that
    writes its rows as JSON Lines (a column each field, a corpus's documents in `text`); else
    None."""
    p = Path(path)
    sep = _CSV_SEPARATORS.get(p.suffix.lower())
    if sep is None:
        return None
    kind = "tab" if sep else "comma"
    return UserError(f"is {kind}-separated values ({p.suffix}), which gptlab does not read; "
                     f"write its rows as JSON Lines: python -c \"import datasets; "
                     f"datasets.load_dataset('csv', data_files={str(p)!r}{sep}, "
                     f"split='train').to_json({p.with_suffix('.jsonl').name!r})\"", path=p)


def json_objects(path: str | Path, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; anything else on a line
    is a UserError naming file and line (`what` says what a line must be). A `.parquet` file
    gives its rows instead, numbered as lines; a `.csv` or `.tsv` one is refused
    (`csv_refused`)."""
    if Path(path).suffix.lower() == ".parquet":
        yield from parquet_objects(path)
        return
    csv = csv_refused(path) if Path(path).exists() else None  # else: not found, said so
    if csv is not None:
        raise csv
    first = True
    # JSON Lines end a line at \n (a CRLF's \r dropped): a lone \r is white space in JSON.
    for lineno, line in utf8_lines(path, lone_cr=False):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            # A JSON array of records (Alpaca's .json, say), as a whole or pretty-printed, whose
            # lines were reported as broken JSON or as no object.
            raise UserError("starts a JSON array; write JSON Lines instead, one JSON object per "
                            "line (jq -c '.[]' turns the array into them)", path=path,
                            line=lineno)
        first = False
        try:
            row = json.loads(line, parse_constant=_refuse_constant, parse_float=_finite_float,
                             parse_int=_readable_int, object_pairs_hook=_unique_keys)
        except _RepeatedKey as e:
            raise UserError(GIVEN_TWICE, path=path, line=lineno,
                            field=_refused_field(line) or e.args[0]) from None
        except json.JSONDecodeError as e:
            # A pretty-printed object breaks off at its line's end ("{" alone on line 1).
            cut = ("; the line ends inside a JSON value: JSON Lines holds each object whole on "
                   "one line (jq -c . writes a pretty-printed file so)"
                   if e.pos >= len(line.rstrip()) else "")
            raise UserError(f"not valid JSON ({_json_error(e)}){cut}", path=path,
                            line=lineno) from None
        except RecursionError:  # valid JSON, but deeper than Python's reader goes
            raise UserError(TOO_DEEP, path=path, line=lineno) from None
        except _NonFinite as e:
            what = "is not a JSON number" if e.args[0] in ("NaN", "Infinity", "-Infinity") \
                else "is too large for a 64-bit float"
            raise UserError(f"not valid JSON ({e.args[0]} {what}; write null or a finite "
                            f"number)", path=path, line=lineno, field=_refused_field(line)) \
                from None
        except _TooLong as e:
            raise UserError(f"cannot be read: {e}", path=path, line=lineno,
                            field=_refused_field(line)) from None
        if not isinstance(row, dict):
            raise UserError(f"each line must be {what}", path=path, line=lineno)
        yield lineno, row


# JSON nested deeper than Python's json module reads (about 1,000 levels: it recurses).
TOO_DEEP = ("cannot be read: its JSON is nested too deeply (arrays or objects inside one "
            "another about 1,000 levels deep, more than Python's reader goes)")


def _json_error(e: json.JSONDecodeError) -> str:
    """`e`'s message and column: "Invalid control character at column 12" (Python's own
    message for it ends "at", which read "at at column")."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def read_json(path: str | Path, what: str | None = "a JSON object") -> Any:
    """The JSON document in `path`; broken JSON or text that is not UTF-8 is a UserError naming
    the file (and the line), and so is anything but an object unless `what` is None. A UTF-8
    byte-order mark (Notepad's) is dropped, as `utf8_lines` drops it."""
    if Path(path).is_dir():
        raise WrongKind("is a directory, not a file", path=path)
    text = None
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        doc = json.loads(text, parse_int=_readable_int, object_pairs_hook=_unique_keys)
    except _RepeatedKey as e:
        # A key written twice by hand (a second "eos_token"): Python's json kept the last.
        key = e.args[0]
        at = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text or "")]
        raise UserError(GIVEN_TWICE, path=path, line=(text or "").count("\n", 0, at[1]) + 1
                        if len(at) > 1 else None, field=key) from None
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg})", path=path, line=e.lineno) from None
    except RecursionError:
        raise UserError(TOO_DEEP, path=path) from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path=path) from None
    except _TooLong as e:
        raise UserError(f"cannot be read: {e}", path=path) from None
    if what is not None and not isinstance(doc, dict):
        raise UserError(f"expected {what}", path=path)
    return doc


def without_nulls(value: Any) -> Any:
    """`value` with every null inside an object left out, as a field that is not there."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


# A Hugging Face Hub dataset's name, `user/name`: what a corpus path that is no local path reads.
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_name(path: str | Path) -> bool:
    """A `user/name` that is no local path: read as a Hugging Face Hub dataset."""
    p = Path(path)
    return not p.exists() and bool(_HUB_NAME.match(str(path))) and not p.suffix


# What a directory of records is read from: its JSON Lines (`.jsonl`, `.ndjson`) and Parquet
# shards (not a `.json`, as a corpus directory reads none: a run directory's `config.json` is no
# data).
RECORD_SUFFIXES = (".jsonl", ".ndjson", ".parquet")


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; a broken line or a missing field is a UserError naming file and line.
    Each row's `_line` is its line number, which errors name: a reserved field, replaced if a
    line has its own (which would move the line an error names). A null is a field left out,
    as in a Parquet file: pandas and `datasets` write JSONL with a null for each field a row
    lacks (a `prompt` row of a file that also has `messages` rows gets `"messages": null`).

    A directory is read as one file: its `.jsonl`, `.ndjson` and `.parquet` shards, under it in
    sorted order (`datasets`' `data/train-00000-of-00002.parquet`, ...); each row's `_file` is
    its shard (reserved too: `record_file`), so that an error names the shard and its line."""
    p = Path(path)
    if is_hub_name(p):
        # `trl-lib/Capybara`, as TRL's examples name a dataset: said as such, not left to read
        # as a local file mistyped.
        raise NotFound(f"file not found; a Hugging Face Hub dataset (user/name) is read only as a "
                       f"corpus (pretrain, tokenizer train, ppo --ptx-data): save the split as "
                       f"JSON Lines and give that file (python -c \"import datasets; datasets."
                       f"load_dataset('{path}', split='train').to_json('{p.name}.jsonl')\")",
                       path=p)
    shards = files_in(p, RECORD_SUFFIXES) if p.is_dir() else None
    rows = []
    for f in shards or [p]:
        for lineno, row in json_objects(f):
            row = without_nulls(row)
            row.pop("_file", None)
            for key in required:
                if key not in row:
                    raise UserError("missing required field" + fields_instead(row, (key,)),
                                    path=f, line=lineno, field=key)
            row["_line"] = lineno
            if shards is not None:
                row["_file"] = str(f)
            rows.append(row)
    return rows


# The fields some record of gptlab's formats reads: one of them is never taken for a misspelling
# of another (TRL's `completions` is stepwise supervision, not a `completion` mistyped).
RECORD_FIELDS = frozenset({"id", "prompt", "completion", "messages", "responses", "finished",
                           "ranked", "chosen", "rejected", "text", "label", "completions",
                           "labels"})


def fields_instead(record: dict, wanted: tuple[str, ...]) -> str:
    """The end of the error for a record that lacks the fields `wanted`: what the line has
    instead (`; the line has 'id', 'prompt' and 'response'`), and the field to rename where one
    of them is a misspelling of a field wanted (`: rename 'response' to 'responses'`), so that
    a file written with another tool's field names says which ones."""
    have = [k for k in record if k not in ("_line", "_file")]
    if not have:
        return "; the line is an empty object"
    names = [f"'{k}'" for k in have[:6]] + ([f"{len(have) - 6} more"] if len(have) > 6 else [])
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    note = f"; the line has {listed}"
    for key in wanted:
        others = {k.lower(): k for k in have if k not in RECORD_FIELDS}
        close = difflib.get_close_matches(key, list(others), n=1, cutoff=0.75)
        if close:
            return f"{note}: rename '{others[close[0]]}' to '{key}'"
    return note


def no_records(path: str | Path, what: str, field: str | None = None) -> UserError:
    """The error for `path`, read by `read_jsonl`, that holds no record (`what`: "prompts"): a
    file, or a directory, naming its shards, each of them empty."""
    p = Path(path)
    if not p.is_dir():
        return UserError(f"no {what} in the file", path=p, field=field)
    shards = [str(f.relative_to(p)) for f in files_in(p, RECORD_SUFFIXES)]
    n = len(shards)
    listed = ", ".join(shards[:3]) + (f" and {n - 3} more" if n > 3 else "")
    held = f"its shard ({listed}) holds" if n == 1 else f"its {n} shards ({listed}) hold"
    return UserError(f"no {what} in this directory: {held} no record", path=p, field=field)


def record_file(record: dict, path: str | Path) -> str | Path:
    """The file `record` of `read_jsonl(path)` came from, for an error to name with its
    `_line`: its shard where `path` is a directory, else `path`."""
    return record.get("_file", path)
