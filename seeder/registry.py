"""The seeder's durable state: manifests, names (with history), assignments and nodes seen.

One SQLite file, `<data-dir>/seeder.db`, in WAL mode so readers never wait on the
writer. `synchronous=FULL`: with WAL, NORMAL may lose the last commits on power
loss, and a lost commit here is a push the operator was told had succeeded or an
assignment the fleet silently forgets. Writes happen per push and per assignment,
not per chunk, so an fsync per commit costs nothing that matters.

The class is plain and synchronous; the app calls it from one dedicated thread, so
there is exactly one connection and no locking of our own.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from manifests import wire

DB_NAME = "seeder.db"

# A node polling its assignment every few seconds must not cost an fsync each time.
NODE_SEEN_WRITE_INTERVAL = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    digest  TEXT PRIMARY KEY,
    bytes   BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name    TEXT PRIMARY KEY,
    digest  TEXT NOT NULL REFERENCES manifests(digest),
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS name_history (
    name    TEXT NOT NULL,
    digest  TEXT NOT NULL,
    at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS name_history_by_name ON name_history(name, at);
CREATE TABLE IF NOT EXISTS assignments (
    name     TEXT NOT NULL,
    node     TEXT,
    selector TEXT,
    created  REAL NOT NULL,
    CHECK ((node IS NULL) <> (selector IS NULL))
);
-- UNIQUE treats NULLs as distinct, so uniqueness is on the coalesced values.
CREATE UNIQUE INDEX IF NOT EXISTS assignments_unique
    ON assignments(name, coalesce(node, ''), coalesce(selector, ''));
CREATE INDEX IF NOT EXISTS assignments_by_node ON assignments(node);
CREATE TABLE IF NOT EXISTS nodes (
    id        TEXT PRIMARY KEY,
    labels    TEXT NOT NULL,
    address   TEXT NOT NULL,
    last_seen REAL NOT NULL
);
"""


class UnknownManifest(KeyError):
    """A name was pointed at a digest that was never published."""


class Registry:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        # One thread uses the connection at a time (the app's executor), maybe not the opener.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._seen: dict[str, tuple[str, str, float]] = {}
        self._selectors: dict[str, dict[str, str]] = {}

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._db:
            return self._db.execute(sql, args).rowcount

    # -- manifests ---------------------------------------------------------

    def has_manifest(self, digest: str) -> bool:
        row = self._db.execute("SELECT 1 FROM manifests WHERE digest = ?", (digest,)).fetchone()
        return row is not None

    def put_manifest(self, digest: str, data: bytes) -> bool:
        """Store validated manifest bytes; False if this digest was already published."""
        n = self._write(
            "INSERT OR IGNORE INTO manifests (digest, bytes, created) VALUES (?, ?, ?)",
            (digest, data, time.time()),
        )
        return n > 0

    def get_manifest(self, digest: str) -> bytes | None:
        row = self._db.execute("SELECT bytes FROM manifests WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- names -------------------------------------------------------------

    def set_name(self, name: str, digest: str) -> str | None:
        """Point `name` at a published manifest; returns the digest it pointed at before.

        Moving a name to the digest it already has changes nothing and adds no history.
        """
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if not self.has_manifest(digest):
                raise UnknownManifest(digest)
            row = self._db.execute("SELECT digest FROM names WHERE name = ?", (name,)).fetchone()
            previous: str | None = None if row is None else row[0]
            if previous != digest:
                self._db.execute(
                    "INSERT INTO names (name, digest, updated) VALUES (?, ?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET digest = excluded.digest,"
                    " updated = excluded.updated",
                    (name, digest, now),
                )
                self._db.execute(
                    "INSERT INTO name_history (name, digest, at) VALUES (?, ?, ?)",
                    (name, digest, now),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return previous

    def get_name(self, name: str) -> dict[str, Any] | None:
        """`{"name", "digest", "updated", "history": [{"digest", "at"}]}`, history newest first."""
        row = self._db.execute(
            "SELECT digest, updated FROM names WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        history = [
            {"digest": d, "at": at}
            for d, at in self._db.execute(
                "SELECT digest, at FROM name_history WHERE name = ? ORDER BY at DESC, rowid DESC",
                (name,),
            )
        ]
        return {"name": name, "digest": row[0], "updated": row[1], "history": history}

    def list_names(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "digest": d, "updated": u}
            for n, d, u in self._db.execute("SELECT name, digest, updated FROM names ORDER BY name")
        ]

    # -- assignments -------------------------------------------------------

    def add_assignment(self, name: str, node: str | None, selector: str | None) -> bool:
        """Assign `name` to a node id or a canonical selector; False if that rule exists."""
        n = self._write(
            "INSERT OR IGNORE INTO assignments (name, node, selector, created) VALUES (?, ?, ?, ?)",
            (name, node, selector, time.time()),
        )
        return n > 0

    def remove_assignment(self, name: str, node: str | None, selector: str | None) -> bool:
        n = self._write(
            "DELETE FROM assignments WHERE name = ? AND node IS ? AND selector IS ?",
            (name, node, selector),
        )
        return n > 0

    def list_assignments(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "node": node, "selector": sel}
            for n, node, sel in self._db.execute(
                "SELECT name, node, selector FROM assignments"
                " ORDER BY name, coalesce(node, ''), coalesce(selector, '')"
            )
        ]

    def _selector(self, text: str) -> dict[str, str]:
        parsed = self._selectors.get(text)
        if parsed is None:
            parsed = self._selectors[text] = wire.parse_labels(text)
        return parsed

    def resolve(self, node: str, labels: dict[str, str]) -> list[dict[str, str]]:
        """What `node` (with `labels`) must hold: `[{"name", "digest"}]` sorted by name.

        Rules for names that have no manifest yet are skipped until the name is pushed.
        """
        wanted: set[str] = set()
        for name, node_id, selector in self._db.execute(
            "SELECT name, node, selector FROM assignments WHERE node = ? OR selector IS NOT NULL",
            (node,),
        ):
            if node_id == node or (
                selector is not None and wire.selector_matches(self._selector(selector), labels)
            ):
                wanted.add(name)
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT name, digest FROM names WHERE name IN ({marks}) ORDER BY name",
            tuple(sorted(wanted)),
        )
        return [{"name": n, "digest": d} for n, d in rows]

    # -- nodes -------------------------------------------------------------

    def node_seen(
        self, node: str, labels: dict[str, str], address: str, now: float | None = None
    ) -> None:
        """Remember a node; rewritten only on change or every NODE_SEEN_WRITE_INTERVAL."""
        now = time.time() if now is None else now
        text = wire.format_labels(labels)
        last = self._seen.get(node)
        if (
            last is not None
            and last[:2] == (text, address)
            and now - last[2] < NODE_SEEN_WRITE_INTERVAL
        ):
            return
        self._write(
            "INSERT INTO nodes (id, labels, address, last_seen) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET labels = excluded.labels,"
            " address = excluded.address, last_seen = excluded.last_seen",
            (node, text, address, now),
        )
        self._seen[node] = (text, address, now)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node that registered, by id; `last_seen` as fresh as this process knows
        (the row itself is rewritten only every NODE_SEEN_WRITE_INTERVAL)."""
        out = []
        for i, lab, a, t in self._db.execute(
            "SELECT id, labels, address, last_seen FROM nodes ORDER BY id"
        ):
            seen = self._seen.get(i)
            if seen is not None:
                lab, a, t = seen[0], seen[1], max(t, seen[2])
            out.append({"id": i, "labels": lab, "address": a, "last_seen": t})
        return out
