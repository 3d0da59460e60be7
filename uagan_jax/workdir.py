"""The workdir's integrity: one training run at a time, files replaced whole, disk errors in words.

* `WorkdirLock`: ``<workdir>/.lock``, held with ``fcntl.flock`` for the whole run. The kernel
  releases a flock when its holder dies (even by ``kill -9``), so a crashed run never blocks the
  next one. The file names its holder (pid, host, start time) for the refusal message.
* `atomic_write_text`: a temporary file beside the target, fsync'ed, then ``os.replace``d over
  it: readers see the old file or the new one, never a half-written one.
* `disk_error`: an ``OSError`` as one line naming the path and the problem (disk full,
  read-only, no permission), for `uagan_jax.errors.UserError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import time

from uagan_jax.errors import UserError

LOCK_NAME = ".lock"

# What each errno a full or protected disk gives means to the user.
_DISK_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def refuse_url(workdir: os.PathLike | str) -> None:
  """Raises `UserError` for a workdir given as a URL (``gs://bucket/run``, ``s3://...``).

  The logs, JSON files and the lock are written through the local file system (`os`, ``flock``),
  which has no notion of a bucket: pathlib turns ``gs://b/run`` into a local folder ``gs:/b/run``
  and the run would train into it unseen by the other hosts. Use a shared file system (NFS,
  Filestore, Lustre) instead.
  """
  parts = pathlib.PurePath(workdir).parts
  first = parts[0] if parts else ""
  if len(first) > 2 and first.endswith(":") and first[:-1].isalnum():  # not a drive letter (c:)
    url = f"{first[:-1]}://{'/'.join(parts[1:])}"  # as typed: pathlib made gs:// into gs:/
    raise UserError(f"workdir {url}: a URL ({first[:-1]}://...) is not a folder; give the "
                    "path of a folder on a file system every process sees (NFS, Lustre, ...)")


def disk_error(path: os.PathLike | str, error: OSError, *, doing: str) -> UserError:
  """``error`` (raised while ``doing`` something to ``path``) as a one-line UserError."""
  problem = _DISK_PROBLEMS.get(error.errno) or error.strerror or str(error)
  return UserError(f"{error.filename or path}: {problem} while {doing}; free space or fix the "
                   "permissions, then run the same command to resume")


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
  """Replaces ``path`` by ``text`` atomically (temporary file, fsync, ``os.replace``).

  Raises:
    UserError: the disk is full or read-only (the old file is left as it was).
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
  except OSError as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise disk_error(path, e, doing="writing it") from None


def append_line(path: os.PathLike | str, line: str) -> None:
  """Appends one line with a single ``write`` to a file opened ``O_APPEND``, then fsyncs.

  A crash can at worst leave the last line cut short; readers (`train_utils.MetricsLog`,
  `visualize`) stop at such a line and a resumed run drops it.
  """
  data = (line + "\n").encode("utf-8")
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      written = os.write(fd, data)
      if written != len(data):  # a short write is how some file systems report a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError as e:
    raise disk_error(path, e, doing="appending to it") from None


def _fsync_folder(folder: pathlib.Path) -> None:
  """Makes a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _process_start_ticks(pid: int) -> str | None:
  """The start time of process ``pid`` in clock ticks since boot (Linux), or None if it is not
  running. Tells a live holder from a later process that reuses its pid."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


class WorkdirLock:
  """An exclusive lock on a workdir for one training run; a context manager.

  Taking the lock:
    * free (no holder, or a holder that died: the kernel released its flock): taken; if the file
      names a holder, the log says the lock was left by it and is taken over.
    * held by a live run: `UserError` naming its pid, host and start time.
    * held, but the holder the file names is gone (same host: its pid is not running, or runs
      another program since; a child that inherited the lock's file descriptor keeps the flock
      alive): stale; the file is replaced by a fresh one and locked, with a note.
    * held by a process on another host (a workdir on NFS where flock reaches the server): never
      taken over, since this host cannot see whether it lives; the message says to check it.
  """

  def __init__(self, workdir: pathlib.Path, *, log=print):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.log = log
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    for _ in range(3):  # a race with another starter replacing a stale file: try again
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._read_holder(fd)
        os.close(fd)
        if not self._is_stale(holder):
          raise UserError(f"{self.path.parent}: in use by another training run ({_who(holder)}); "
                          "wait for it to finish or stop it, or use another --workdir") from None
        self.log(f"{self.path}: lock held for {_who(holder)}, which is no longer running; taking "
                 "it over")
        with contextlib.suppress(FileNotFoundError):
          self.path.unlink()
        continue
      # The file may have been replaced between open and flock (a stale-lock takeover by
      # another starter): only a lock on the file that is at the path counts.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = self._read_holder(fd)
      if previous:
        self.log(f"{self.path}: taking over the lock left by {_who(previous)} (it stopped "
                 "without releasing it, e.g. killed)")
      self._write_holder(fd)
      self._fd = fd
      return
    raise UserError(f"{self.path}: could not take the lock (other runs keep starting on this "
                    "workdir)")

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)  # a clean exit leaves no holder to report
    os.close(self._fd)  # closing releases the flock
    self._fd = None

  def _open(self) -> int:
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise disk_error(self.path, e, doing="creating the workdir's lock file") from None

  @staticmethod
  def _read_holder(fd: int) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 4096).decode("utf-8", "replace")
      return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
      return {}

  def _write_holder(self, fd: int) -> None:
    pid = os.getpid()
    holder = {"pid": pid, "host": socket.gethostname(), "ticks": _process_start_ticks(pid),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps(holder).encode("utf-8"))
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise disk_error(self.path, e, doing="writing the workdir's lock file") from None

  @staticmethod
  def _is_stale(holder: dict) -> bool:
    """Whether a held lock's named holder is certainly gone (only decidable on this host)."""
    if not holder or holder.get("host") != socket.gethostname():
      return False
    ticks = _process_start_ticks(int(holder.get("pid", -1)))
    return ticks is None or (holder.get("ticks") is not None and ticks != holder["ticks"])


def _who(holder: dict) -> str:
  if not holder:
    return "holder unknown"
  return (f"process {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}")


# ------------------------------------------------------------------------------------------------
# What a workdir holds
# ------------------------------------------------------------------------------------------------

# The recipe a run was started with (``--config FILE[:variant]`` and its overrides): config.json
# holds the resolved values, this file how they were asked for, so that a refusal can name it.
RUN_RECORD = "run.json"


def write_run_record(workdir: pathlib.Path, *, recipe: str | None, overrides=()) -> None:
  """Records the recipe of a run once: a resumed run keeps the record of the run it resumes."""
  path = pathlib.Path(workdir) / RUN_RECORD
  if recipe is None or path.exists():
    return
  atomic_write_text(path, json.dumps({"recipe": recipe, "overrides": list(overrides)}, indent=2))


def _held_family(workdir: pathlib.Path) -> str | None:
  """The model family of the run whose config.json is in ``workdir``, or None."""
  try:
    return json.loads((pathlib.Path(workdir) / "config.json").read_text())["model"]["name"]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def held_run(workdir: pathlib.Path) -> str | None:
  """'a segan run (configs/segan.py:demo)': what a workdir with a config.json holds, or None."""
  workdir = pathlib.Path(workdir)
  family = _held_family(workdir)
  if family is None:
    return None
  try:
    recipe = json.loads((workdir / RUN_RECORD).read_text()).get("recipe")
  except (OSError, ValueError, AttributeError):
    recipe = None
  return f"a {family} run" + (f" ({recipe})" if recipe else "")


def check_same_family(workdir: pathlib.Path, *, family: str, recipe: str | None) -> None:
  """Refuses, in one line naming what is there, to train ``family`` into a workdir whose
  checkpoints belong to a run of another model family (checked before any data is read)."""
  workdir = pathlib.Path(workdir)
  checkpoints = workdir / "checkpoints"
  if not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    return
  held = _held_family(workdir)
  # Without a readable config.json there is nothing to compare with; the checkpoint's own shapes
  # are checked on restore.
  if held is not None and held != family:
    asked = f"{family}" + (f" ({recipe})" if recipe else "")
    raise UserError(f"{workdir} holds {held_run(workdir)}; this command trains {asked}: use "
                    f"another --workdir (or delete {workdir} to start afresh)")
