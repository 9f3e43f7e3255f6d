"""The embedded default backend: one SQLite file under the data directory, served by one
worker thread that every pattern's adapter on that file shares (so the event loop never
waits on disk). WAL mode and a busy timeout let several gateway worker processes share it."""

from __future__ import annotations

from typing import Literal

from adapters.backends import BackendSettings, BackendType, Environment
from adapters.keyvalue.sqlite import SqliteKeyValue
from adapters.queue.sqlite import SqliteQueue
from adapters.reader.sqlite import SqliteReader
from adapters.sqlite_worker import SqliteWorker
from adapters.transact.sqlite import SqliteTransact

PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000")


class SqliteSettings(BackendSettings):
    type: Literal["sqlite"] = "sqlite"
    path: str = "prism.db"  # relative to data_dir


def connect(settings: SqliteSettings, environment: Environment) -> SqliteWorker:
    return SqliteWorker(environment.data_dir / settings.path, PRAGMAS)


BACKEND = BackendType(
    name="sqlite",
    settings=SqliteSettings,
    connect=connect,
    adapters={
        "KEY_VALUE": lambda worker, environment: SqliteKeyValue(worker),
        "QUEUE": lambda worker, environment: SqliteQueue(worker),
        "READER": lambda worker, environment: SqliteReader(worker),
        "TRANSACT": lambda worker, environment: SqliteTransact(worker),
    },
)
