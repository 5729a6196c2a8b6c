"""Errors a user can act on. The CLI prints them without a traceback."""
from __future__ import annotations

import errno as _errno
import os as _os


class VisualSearchError(Exception):
    """Base class: the message says what is wrong and what to do."""


class DatasetError(VisualSearchError):
    """The dataset is missing, unreadable or too small."""


class BackboneError(VisualSearchError):
    """A backbone or its weights cannot be loaded."""


class ClassifierError(VisualSearchError):
    """The classifier cannot be trained, loaded or used as configured."""


class IndexBackendError(VisualSearchError):
    """The vector index is unreachable, missing or incompatible."""




class EnvironmentFault(VisualSearchError):
    """The machine refused a read or write: no space, read-only, no permission, a vanished
    folder, too many open files. Not a bug and not bad data: the message names the path,
    says what happened in plain words and what to do; :attr:`exit_code` is the CLI's exit
    status for this kind (see :data:`EXIT_CODES`).
    """

    def __init__(self, kind: str, path, cause: str, todo: str, errno: int | None = None):
        self.kind, self.path, self.cause, self.todo, self.errno = kind, path, cause, todo, errno
        where = str(path) if path else "(a file the system did not name; rerun with --verbose)"
        super().__init__(f"{where}: {cause}; {todo}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


_CHOOSE = "or choose another folder with the paths.* settings in application.yaml"
#: kind -> (errnos, plain-words cause, what to do)
_FAULTS = {
    "no-space": ((_errno.ENOSPC, _errno.EDQUOT), "no space left on the device (or the disk quota is used up)",
                 f"free some space there, {_CHOOSE}; finished work is kept, rerun to resume"),
    "file-too-large": ((_errno.EFBIG,), "the file grew past the size this system allows (a file size limit)",
                       f"raise the limit (ulimit -f), {_CHOOSE}; finished work is kept, rerun to resume"),
    "read-only": ((_errno.EROFS,), "the file system is read-only",
                  f"make it writable, {_CHOOSE}"),
    "permission": ((_errno.EACCES, _errno.EPERM), "permission denied",
                   f"fix the permissions (this process runs as user id {_os.getuid() if hasattr(_os, 'getuid') else '?'}), "
                   f"{_CHOOSE}"),
    "missing": ((_errno.ENOENT, _errno.ENOTDIR), "the file or folder does not exist (it may have been removed "
                "or unmounted while running)", f"restore it (or remount the disk), {_CHOOSE}; then rerun"),
    "too-many-files": ((_errno.EMFILE, _errno.ENFILE), "too many open files",
                       "raise the limit (ulimit -n) or lower backbone.workers; finished work is kept, rerun to resume"),
    "io-error": ((_errno.EIO,), "input/output error (a failing disk or a lost network mount)",
                 f"check the disk or mount, {_CHOOSE}; finished work is kept, rerun to resume"),
}
#: ``visualsearch`` exit status of each kind of fault (2 is a configuration or data error, 1 a bug)
EXIT_CODES = {"no-space": 3, "file-too-large": 3, "read-only": 4, "permission": 5, "missing": 6,
              "too-many-files": 7, "io-error": 8}
#: errors of reading that say nothing about the file read (so it is not skipped as a bad image)
MACHINE_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE})
_BY_ERRNO = {n: kind for kind, (nums, _, _) in _FAULTS.items() for n in nums}


def environment_fault(error: OSError, path=None, *, temp=None) -> "EnvironmentFault | None":
    """The :class:`EnvironmentFault` for an ``OSError`` of the machine, or None for other errors.

    ``path`` names the file being written when the error itself does not (numpy and zipfile
    raise ``ENOSPC`` without a file name); the error's own file name wins where it has one,
    except the temporary file ``temp`` the writer was filling (then ``path`` is named).
    """
    if isinstance(error, EnvironmentFault):
        return error
    kind = _BY_ERRNO.get(getattr(error, "errno", None))
    if kind is None:
        return None
    _, cause, todo = _FAULTS[kind]
    where = getattr(error, "filename", None)
    if not where or (temp is not None and str(where) == str(temp)):
        where = path
    return EnvironmentFault(kind, where, cause, todo, error.errno)
