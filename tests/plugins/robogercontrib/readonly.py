"""A plugin that only reads, and so makes its database session read-only
before its query, as a careful author might: whichever of the three
backends' statements for it the server's database takes.

Endpoint config: {"out": PATH}: for each event one JSON line with the
statement the database took and the number of addresses it read.
"""

import json

from roboger.core import get_db

READ_ONLY = (
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",  # PostgreSQL
    "SET SESSION TRANSACTION READ ONLY",  # MySQL, MariaDB
    "PRAGMA query_only = ON",  # SQLite
)


def load(**kwargs):
    pass


def validate_plugin_config(**kwargs):
    pass


def validate_config(**kwargs):
    pass


def send(config, event_id, **kwargs):
    db = get_db()
    took = None
    for sql in READ_ONLY:
        try:
            db.execute(sql)
            took = sql
            break
        except Exception:
            pass
    n = db.execute("SELECT count(*) AS n FROM addr").fetchone().n
    with open(config["out"], "a") as f:
        f.write(json.dumps({"took": took, "addresses": n}) + "\n")
