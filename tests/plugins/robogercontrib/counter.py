"""A plugin that counts its events in a table of its own, written as an
author new to Roboger might: BEGIN, the INSERT and COMMIT as separate
calls, each through get_db().

Endpoint config: {"out": PATH}: for each event one JSON line with what
each statement answered ("done" or the error) and the count after it.
"""

import json

from roboger.core import get_db


def load(**kwargs):
    get_db().execute("CREATE TABLE IF NOT EXISTS counter_event (event_id TEXT)")


def validate_plugin_config(**kwargs):
    pass


def validate_config(**kwargs):
    pass


def send(config, event_id, **kwargs):
    db = get_db()
    said = {}
    for sql in ("BEGIN", "INSERT INTO counter_event VALUES (:e)", "COMMIT"):
        try:
            db.execute(sql, {"e": event_id} if ":e" in sql else {})
            said[sql.split()[0]] = "done"
        except Exception as e:
            said[sql.split()[0]] = str(e)
    said["count"] = db.execute("SELECT count(*) AS n FROM counter_event").fetchone().n
    with open(config["out"], "a") as f:
        f.write(json.dumps(said) + "\n")
