"""A throwaway PostgreSQL server on loopback, from the machine's own binaries (Debian's postgresql
package: initdb, pg_ctl), for the tests and benchmarks of the shared live store. PostgreSQL refuses
to run as root: as root, it runs as the postgres user."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from benchmarks.load import free_port

__all__ = ["LocalPostgres", "postgres_missing"]


def _binaries() -> Path | None:
    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(found) / "initdb").exists() and (Path(found) / "pg_ctl").exists():
            return Path(found)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_missing() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if _binaries() is None:
        return "no PostgreSQL server binaries (Debian: apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class LocalPostgres:
    """`initdb` into `folder`, then `start()` / `stop()`; `database(name)` gives a fresh database's URL."""

    def __init__(self, folder: Path) -> None:
        missing = postgres_missing()
        if missing:
            raise RuntimeError(missing)
        self.bin, self.folder, self.port = _binaries(), Path(folder), free_port()
        self.url = f"postgresql://corella@127.0.0.1:{self.port}/postgres"
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            parent = self.folder
            while parent != parent.parent:  # the postgres user walks down to it
                os.chmod(parent, os.stat(parent).st_mode | 0o005)
                parent = parent.parent
        initdb = [str(self.bin / "initdb"), "-D", str(self.folder / "data"), "-U", "corella", "-A", "trust",
                  "--no-sync"]  # fmt: skip
        subprocess.run(_as_postgres(initdb), check=True, capture_output=True, timeout=120)

    def ctl(self, *args: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-l",
                                     str(self.folder / "server.log"), "-o", options, "-w", *args]),
                       check=True, capture_output=True, timeout=120)  # fmt: skip

    def start(self) -> LocalPostgres:
        self.ctl("start")
        return self

    def stop(self) -> None:
        self.ctl("stop", "-m", "fast")

    def database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"
