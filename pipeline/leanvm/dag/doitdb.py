"""doit's record of what it built (out/.doit.db), with one-line errors.

doit's own sqlite3 backend ends in a traceback when the disk fills while it saves (or the
file is damaged); this one says it in one line and exits. Registered as doit's `leanvm`
backend through the package's entry points (pyproject.toml), which leanvm's doit settings name.
"""

import functools
import sqlite3
from collections.abc import Callable
from typing import Any, NoReturn

from doit.dependency import DatabaseException, SqliteDB

from leanvm.errors import LeanvmError, report


def _fail(name: str, error: Exception) -> NoReturn:
    # doit wraps sqlite's own error in a paragraph of its own: say sqlite's
    cause = error.__context__ if isinstance(error.__context__, sqlite3.Error) else error
    raise SystemExit(report(LeanvmError(f"{name}: doit cannot keep its records there: {cause}",
                                        "free disk space (or remove that file) and run again")))


def _one_line(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` of doit's SqliteDB, with sqlite's errors said in one line."""
    @functools.wraps(method)
    def guarded(self: SqliteDB, *args: Any) -> Any:
        try:
            return method(self, *args)
        except sqlite3.Error as e:
            _fail(self.name, e)
    return guarded


class OutDB(SqliteDB):
    def __init__(self, name: str, codec: Any, **options: Any) -> None:
        try:
            super().__init__(name, codec, **options)
        except (sqlite3.Error, DatabaseException) as e:
            _fail(name, e)

    _get_task_data = _one_line(SqliteDB._get_task_data)
    in_ = _one_line(SqliteDB.in_)
    dump = _one_line(SqliteDB.dump)
    remove = _one_line(SqliteDB.remove)
    remove_all = _one_line(SqliteDB.remove_all)
