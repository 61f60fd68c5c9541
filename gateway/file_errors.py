"""One line on why a file could not be created or opened, for start-up and health messages.

`OSError` says ``[Errno 20] Not a directory: '/srv/gw/logs'`` when the culprit is ``/srv/gw``, a
file where a directory should be, and ``File exists`` when ``mkdir`` meets a file. The operator
needs the component at fault and the reason in words.
"""

from __future__ import annotations

from pathlib import Path


def describe_os_error(exc: OSError, path: Path) -> str:
    """Why ``path`` (a file or directory being opened or created) failed, naming the component
    at fault when it is not ``path`` itself: ``/srv/gw is not a directory``, ``Is a directory``,
    ``/srv/gw/logs: Permission denied``."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return f"{blocker} is not a directory"
    reason = exc.strerror or str(exc)
    culprit = Path(exc.filename) if exc.filename else path
    return reason if culprit == path else f"{culprit}: {reason}"


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a directory, if any."""
    for ancestor in path.parents:
        if ancestor.exists():
            return None if ancestor.is_dir() else ancestor
    return None
