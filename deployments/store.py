"""Sessions and versions in a database, through SQLAlchemy: an SQLite file on one machine,
PostgreSQL on a cluster. Every ingress replica reads and writes here, so any replica serves any
session, and a restart loses nothing that was acknowledged (a version is committed before its
response is sent). Tokens are stored only as SHA-256 hashes. The schema is Alembic's to change
(`deployments/migrations`); a store migrates its database to the newest revision when it opens it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData()  # as the newest migration leaves the schema (queries only: never created from here)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("home", sa.String(64)),
)
versions = sa.Table(
    "versions",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("session_id", sa.String(32), sa.ForeignKey("sessions.id"), nullable=False),
    sa.Column("parent_id", sa.String(32)),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("mask_sha256", sa.String(64)),
    sa.Column("stats", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class VersionRow:
    """One version: a generation (`parent_id` None; `settings`: seed, steps, guidance, size) or an
    edit (`settings`: mode, and `capture` where the service found the mask)."""

    id: str
    session_id: str
    parent_id: str | None
    prompt: str
    settings: dict
    image_sha256: str
    mask_sha256: str | None
    stats: dict
    created_at: float = field(default_factory=time.time)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()  # tokens are random: no salt or stretching needed


class SessionStore:
    def __init__(self, url: str):
        """`url`: an SQLAlchemy database URL, `sqlite:///path/fisedit.db` or
        `postgresql+psycopg://user:password@host/db`."""
        self.url = sa.make_url(url)
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite and self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(
            self.url,
            connect_args={"timeout": 30} if sqlite else {},  # several ingress processes share the file
            pool_pre_ping=not sqlite,  # a restarted PostgreSQL server: reconnect, don't fail a request
        )
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_wal)
        self.migrate()

    # ---- schema -------------------------------------------------------------------------------
    def revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    @staticmethod
    def head() -> str:
        return ScriptDirectory(str(MIGRATIONS)).get_current_head()

    def migrate(self, attempts: int = 5) -> None:
        """Upgrade the database to the newest revision. Replicas starting together may race: the
        loser of a race finds the schema made, or retries."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        for attempt in range(attempts):
            if self.revision() == self.head():
                return
            try:
                with self.engine.begin() as connection:
                    if connection.dialect.name == "postgresql":  # one migrator at a time
                        connection.execute(sa.text("SELECT pg_advisory_xact_lock(7275301)"))
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                return
            except sa.exc.DBAPIError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # ---- sessions -----------------------------------------------------------------------------
    def create_session(self, session_id: str, token: str, root: VersionRow) -> None:
        """A new session and its generation, in one transaction."""
        with self.engine.begin() as connection:
            row = {"id": session_id, "token_sha256": token_hash(token), "created_at": root.created_at}
            connection.execute(sessions.insert().values(**row, home=root.stats.get("replica")))
            connection.execute(versions.insert().values(**_columns(root)))

    def authorized(self, session_id: str, token: str) -> bool:
        with self.engine.connect() as connection:
            stored = connection.scalar(sa.select(sessions.c.token_sha256).where(sessions.c.id == session_id))
        return stored is not None and secrets.compare_digest(stored, token_hash(token))

    def home(self, session_id: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.scalar(sa.select(sessions.c.home).where(sessions.c.id == session_id))

    def count_sessions(self) -> int:
        with self.engine.connect() as connection:
            return connection.scalar(sa.select(sa.func.count()).select_from(sessions))

    def delete_session(self, session_id: str) -> int:
        """Delete a session and its versions; how many versions it had (0: no such session)."""
        with self.engine.begin() as connection:
            deleted = connection.execute(versions.delete().where(versions.c.session_id == session_id))
            connection.execute(sessions.delete().where(sessions.c.id == session_id))
        return deleted.rowcount

    # ---- versions -----------------------------------------------------------------------------
    def add_version(self, row: VersionRow) -> bool:
        """Commit an edit; False if its session was deleted meanwhile (nothing is written then)."""
        with self.engine.begin() as connection:
            home = row.stats.get("replica")
            updated = connection.execute(
                sessions.update().where(sessions.c.id == row.session_id).values(home=home)
            )
            if updated.rowcount == 0:
                return False
            connection.execute(versions.insert().values(**_columns(row)))
        return True

    def version(self, session_id: str, version_id: str) -> VersionRow | None:
        with self.engine.connect() as connection:
            query = sa.select(versions).where(versions.c.session_id == session_id)
            row = connection.execute(query.where(versions.c.id == version_id)).mappings().first()
        return _row(row) if row is not None else None

    def versions(self, session_id: str) -> list[VersionRow]:
        """A session's versions in the order they were made."""
        with self.engine.connect() as connection:
            query = sa.select(versions).where(versions.c.session_id == session_id).order_by(versions.c.seq)
            return [_row(row) for row in connection.execute(query).mappings()]

    def lineage(self, session_id: str, version_id: str) -> list[VersionRow]:
        """The chain from the session's generation to `version_id`, root first ([] if unknown)."""
        by_id = {v.id: v for v in self.versions(session_id)}
        chain, at = [], by_id.get(version_id)
        while at is not None:
            chain.append(at)
            at = by_id.get(at.parent_id) if at.parent_id is not None else None
        return chain[::-1]


def _columns(row: VersionRow) -> dict:
    return {name: getattr(row, name) for name in VersionRow.__dataclass_fields__}


def _row(mapping) -> VersionRow:
    return VersionRow(**{name: mapping[name] for name in VersionRow.__dataclass_fields__})


def _sqlite_wal(connection, _record) -> None:
    """Write-ahead logging: readers don't wait for a writer in another process."""
    connection.execute("PRAGMA journal_mode=WAL")
