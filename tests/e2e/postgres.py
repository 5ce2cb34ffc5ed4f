"""A throwaway PostgreSQL server from the installed binaries (initdb + pg_ctl in a temporary directory).

``pg_ctl`` refuses to run as root, and CI runs as root: then the server runs as the ``postgres`` user through
``runuser`` (the data directory is chowned to it). A non-root user runs the binaries directly. The server listens on
127.0.0.1 only, with trust authentication, and is removed when stopped.

Without the binaries the tests skip, unless ``REQUIRE_POSTGRES=1`` (set by ``.ci/run``) turns that into a failure.

Why not pytest-postgresql: its process fixture starts ``pg_ctl`` as the current user, and ``pg_ctl`` refuses root,
which is what CI runs as; switching to the ``postgres`` user is the part this module adds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.processes import free_port

DEFAULT_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def find_bin_dir() -> Path | None:
    """``POE_PG_BIN`` if set, else the newest Debian PostgreSQL, else ``initdb`` on PATH."""
    candidates = [os.environ["POE_PG_BIN"]] if os.environ.get("POE_PG_BIN") else list(DEFAULT_BIN_DIRS)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def require_bin_dir() -> Path:
    found = find_bin_dir()
    if found is None:
        message = ("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: "
                   "install them (apt-get install postgresql) or set POE_PG_BIN")
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (REQUIRE_POSTGRES=1 makes this a failure)", pytrace=False)
        pytest.skip(message)
    return found


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int

    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.root, user="postgres", group="postgres")
        init = self._run("initdb", "-D", str(self.root / "data"), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                         "--no-sync", "--no-instructions")
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        started = self._run("pg_ctl", "-D", str(self.root / "data"), "-o", options, "-l", str(self.root / "log"),
                            "-w", "-t", "60", "start")
        if started.returncode:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed on port {self.port}: {started.stdout}{started.stderr}{log}")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")  # throwaway data
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL (psycopg2, the driver dagster-postgres needs)."""
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{db}"


def start_server() -> PostgresServer:
    """A running server on a free port (retried on a port taken in the meantime)."""
    bin_dir = require_bin_dir()
    last: Exception | None = None
    for _ in range(3):
        server = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="poe-pg-")), free_port())
        try:
            return server.start()
        except RuntimeError as exc:
            last = exc
            server.stop()
    raise RuntimeError(f"Could not start PostgreSQL: {last}")
