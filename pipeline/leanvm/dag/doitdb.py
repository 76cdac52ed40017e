"""doit's record of what it built (out/.doit.db), with one-line errors.

doit's own sqlite3 backend ends in a traceback when the disk fills while it saves (or the
file is damaged); this one says it in one line and exits. Registered as doit's `leanvm`
backend through the package's entry points (pyproject.toml), which leanvm's doit settings name.
"""

import sqlite3
from typing import Any, NoReturn

from doit.dependency import DatabaseException, SqliteDB

from leanvm.errors import LeanvmError, report


def _fail(name: str, error: Exception) -> NoReturn:
    # doit wraps sqlite's own error in a paragraph of its own: say sqlite's
    cause = error.__context__ if isinstance(error.__context__, sqlite3.Error) else error
    raise SystemExit(report(LeanvmError(f"{name}: doit cannot keep its records there: {cause}",
                                        "free disk space (or remove that file) and run again")))


class OutDB(SqliteDB):
    def __init__(self, name: str, codec: Any, **options: Any) -> None:
        try:
            super().__init__(name, codec, **options)
        except (sqlite3.Error, DatabaseException) as e:
            _fail(name, e)

    def _get_task_data(self, task_id: str) -> dict:
        try:
            return super()._get_task_data(task_id)
        except sqlite3.Error as e:
            _fail(self.name, e)

    def in_(self, task_id: str) -> bool:
        try:
            return super().in_(task_id)
        except sqlite3.Error as e:
            _fail(self.name, e)

    def dump(self) -> None:
        try:
            super().dump()
        except sqlite3.Error as e:
            _fail(self.name, e)

    def remove(self, task_id: str) -> None:
        try:
            super().remove(task_id)
        except sqlite3.Error as e:
            _fail(self.name, e)

    def remove_all(self) -> None:
        try:
            super().remove_all()
        except sqlite3.Error as e:
            _fail(self.name, e)
