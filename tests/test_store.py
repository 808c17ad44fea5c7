"""The session store (SQLAlchemy, Alembic) on SQLite and on a real PostgreSQL server, and the blob
store. The PostgreSQL server is started here, in a temporary folder, from the distribution's
binaries (`.ci/run` installs them); without them these cases are skipped, except in CI."""

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

sa = pytest.importorskip("sqlalchemy")
from fisedit_ray.deployments.blobs import BlobStore  # noqa: E402
from fisedit_ray.deployments.store import SessionStore, VersionRow, token_hash  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL server in a temporary folder, on a free loopback port."""

    def __init__(self, bin_dir: str):
        self.bin_dir, self.folder, self.port = bin_dir, tempfile.mkdtemp(prefix="fisedit-pg-"), _free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses root
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", f"{self.folder}/data", "-A", "trust", "-U", "fisedit")
        self.url = f"postgresql+psycopg://fisedit@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, f"{self.bin_dir}/{program}", *args], check=True, capture_output=True
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", f"{self.folder}/data", "-o", options, "-l", f"{self.folder}/log", "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", f"{self.folder}/data", "-m", "immediate", "stop")


@pytest.fixture(scope="module")
def postgres():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI must test the store on PostgreSQL: apt-get install postgresql")
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    server = PostgresServer(os.path.dirname(found[-1]))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    name = f"t{time.time_ns()}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/data/fisedit.db"
    return fresh_database(request.getfixturevalue("postgres").url)


def generation(session_id="s1", version_id="v0", replica="r1") -> VersionRow:
    settings = {"seed": 3, "steps": 20, "guidance": 7.5, "size": None}
    stats = {"replica": replica}
    return VersionRow(version_id, session_id, None, "a red circle", settings, "a" * 64, None, stats)


def edit(parent: VersionRow, version_id: str, replica="r1") -> VersionRow:
    settings = {"mode": "sparse", "capture": {"capture_steps": 1}}
    stats = {"replica": replica, "mask_ratio": 0.05}
    prompt = "a blue square"
    return VersionRow(version_id, parent.session_id, parent.id, prompt, settings, "b" * 64, "c" * 64, stats)


def test_a_new_database_is_migrated_to_the_newest_revision(url):
    store = SessionStore(url)
    assert store.revision() == SessionStore.head() == "0001"
    inspector = sa.inspect(store.engine)
    assert {"sessions", "versions", "alembic_version"} <= set(inspector.get_table_names())
    SessionStore(url)  # opening it again migrates nothing and keeps what it holds


def test_sessions_versions_and_lineage_round_trip(url):
    store = SessionStore(url)
    root = generation()
    store.create_session("s1", "secret-token", root)
    a = edit(root, "v1")
    b = edit(a, "v2", replica="r2")
    c = edit(root, "v3")  # a branch from the root
    for version in (a, b, c):
        assert store.add_version(version)
    reopened = SessionStore(url)  # another replica, or the service after a restart
    assert [v.id for v in reopened.versions("s1")] == ["v0", "v1", "v2", "v3"]
    assert reopened.version("s1", "v2") == b  # settings and stats JSON come back as written
    assert [v.id for v in reopened.lineage("s1", "v2")] == ["v0", "v1", "v2"]
    assert [v.id for v in reopened.lineage("s1", "v3")] == ["v0", "v3"]
    assert reopened.lineage("s1", "nope") == [] and reopened.version("s2", "v1") is None
    assert reopened.home("s1") == "r1"  # the replica of the last edit (v3)
    assert reopened.count_sessions() == 1


def test_tokens_are_stored_only_as_hashes(url):
    store = SessionStore(url)
    store.create_session("s1", "secret-token", generation())
    assert store.authorized("s1", "secret-token")
    assert not store.authorized("s1", "secret-tokem") and not store.authorized("s2", "secret-token")
    with store.engine.connect() as connection:
        dumped = " ".join(str(row) for row in connection.execute(sa.text("SELECT * FROM sessions")))
    assert "secret-token" not in dumped and token_hash("secret-token") in dumped


def test_deleting_a_session_deletes_its_versions_and_refuses_late_edits(url):
    store = SessionStore(url)
    root = generation()
    store.create_session("s1", "t", root)
    store.create_session("s2", "t", generation("s2", "w0"))
    store.add_version(edit(root, "v1"))
    assert store.delete_session("s1") == 2
    assert store.versions("s1") == [] and not store.authorized("s1", "t")
    assert not store.add_version(edit(root, "v2"))  # an edit that finishes after the delete
    assert store.versions("s1") == [] and [v.id for v in store.versions("s2")] == ["w0"]
    assert store.delete_session("s1") == 0


def test_a_version_id_is_unique(url):
    store = SessionStore(url)
    root = generation()
    store.create_session("s1", "t", root)
    store.add_version(edit(root, "v1"))
    with pytest.raises(sa.exc.IntegrityError):
        store.add_version(edit(root, "v1"))
    assert [v.id for v in store.versions("s1")] == ["v0", "v1"]  # the failed transaction left nothing


def test_replicas_writing_at_once_lose_nothing(url):
    """Four writers (as four ingress replicas would) add edits to one session at the same time."""
    SessionStore(url).create_session("s1", "t", generation())
    stores = [SessionStore(url) for _ in range(4)]
    root = generation()

    def write(k):
        for i in range(10):
            assert stores[k].add_version(edit(root, f"v{k}-{i}"))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stores[0].versions("s1")) == 41


def test_a_database_that_goes_away_fails_calls_until_it_is_back(postgres):
    store = SessionStore(fresh_database(postgres.url))
    store.create_session("s1", "t", generation())
    postgres.stop()
    try:
        with pytest.raises(sa.exc.OperationalError):
            store.authorized("s1", "t")
    finally:
        postgres.start()
    assert store.authorized("s1", "t")  # the pool reconnects: no restart of the service


def test_the_ingress_answers_503_with_retry_after_while_the_database_is_away():
    pytest.importorskip("ray")
    from fastapi import HTTPException

    from fisedit_ray.deployments.ingress import Ingress

    def unreachable():
        raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(HTTPException) as refused:  # the method as Serve runs it (it reads no state)
        asyncio.run(Ingress.func_or_class._db(None, unreachable))
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "2"}
    assert "session database is unavailable (connection refused)" in refused.value.detail


def test_blobs_are_addressed_by_content(tmp_path):
    blobs = BlobStore(str(tmp_path / "blobs"))
    digest = blobs.put(b"\x89PNG one")
    assert blobs.put(b"\x89PNG one") == digest and len(digest) == 64
    assert BlobStore(f"file://{tmp_path}/blobs").get(digest) == b"\x89PNG one"  # a URL, another process
    assert list((tmp_path / "blobs").rglob("*.partial")) == []
    with pytest.raises(KeyError, match="no blob"):
        blobs.get("0" * 64)
    with pytest.raises(ValueError, match="not a blob address"):
        blobs.get("../../etc/passwd")


def test_blobs_in_an_fsspec_memory_filesystem():
    blobs = BlobStore("memory://fisedit-test/blobs")
    digest = blobs.put(b"mask")
    assert BlobStore("memory://fisedit-test/blobs").get(digest) == b"mask"
