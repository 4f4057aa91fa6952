"""A plugin written exactly as the original Roboger's plugin guide says
(plugin-development.rst), for the original's `robogercontrib` package.
The tests run it, unmodified, through roboger-plugin-python.

Endpoint config: {"out": PATH} (required; unknown keys refused): each
event is written there as one JSON line, with what the roboger.core
functions answered. Plugin config: {"greeting": str}.
"""

__version__ = "0.3.0"
__description__ = "seed-style test plugin"

import json

from roboger.core import logger, log_traceback
from roboger.core import (bucket_put, bucket_get, bucket_touch, get_timeout, convert_level,
                          get_app, get_db, get_plugin, get_real_ip, is_use_lastrowid,
                          is_use_limits, spawn)

_d = {}

app = get_app()


@app.route("/plugin/seed/hello/<who>", methods=["GET", "POST"])
def hello(who):
    return {"hello": who, "greeting": _d.get("greeting"), "ip": get_real_ip()}


def validate_plugin_config(plugin_config, **kwargs):
    if set(plugin_config) - {"greeting"}:
        raise ValueError("only greeting is accepted")


def load(plugin_config, **kwargs):
    _d["greeting"] = plugin_config.get("greeting")
    # A table of its own with an id the database makes; SQLite's form,
    # else PostgreSQL's and MySQL's.
    for ddl in ("CREATE TABLE IF NOT EXISTS seed_row (id INTEGER PRIMARY KEY AUTOINCREMENT, msg TEXT)",
                "CREATE TABLE IF NOT EXISTS seed_row (id SERIAL PRIMARY KEY, msg TEXT)"):
        try:
            get_db().execute(ddl)
            break
        except Exception as e:
            logger.debug(f"{__name__}: {e}")
    logger.info(f"{__name__} loaded, greeting {_d['greeting']}")


def insert_row(msg):
    """The row's id as the original's plugin guide says to get it: through
    lastrowid where the database has no RETURNING."""
    db = get_db()
    if is_use_lastrowid():
        return db.execute("INSERT INTO seed_row (msg) VALUES (:m)", {"m": msg}).lastrowid
    return db.execute("INSERT INTO seed_row (msg) VALUES (:m) RETURNING id", {"m": msg}).fetchone().id


def validate_config(config, **kwargs):
    unknown = set(config) - {"out"}
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(sorted(unknown))}")
    if not isinstance(config.get("out"), str):
        raise ValueError("out: a file path is required")


def refusal(fn):
    try:
        fn()
        return "accepted"
    except Exception as e:
        return str(e)


def send(config, event_id, msg, formatted_subject, level, media, media_fname, **kwargs):
    logger.debug(f"{__name__} will do something")
    try:
        1 / 0
    except Exception as e:
        logger.debug(f"{__name__} oops, error: {e}")
        log_traceback()
    object_id = bucket_put(media or msg.encode(), creator=f"plugin.{__name__}",
                           addr_id=kwargs.get("addr_id"), mimetype="text/plain",
                           fname=media_fname or "msg.txt", public=True)
    bucket_touch(object_id)
    stored = bucket_get(object_id)
    record = {
        "event_id": event_id, "msg": msg, "subject": formatted_subject, "level": level,
        "sender": kwargs.get("sender"), "object_id": object_id,
        "stored": stored["content"].decode(errors="replace"), "creator": stored["creator"],
        "timeout": get_timeout(), "warn": convert_level("warn"), "limits": is_use_limits(),
        "spawned": spawn(lambda x: x * 2, 21).result(),
        "db": get_db().execute("SELECT :v AS v", {"v": 7}).fetchone().v,
        "lastrowid": get_db().execute("INSERT INTO seed_row (msg) VALUES ('x')").lastrowid,
        "other_plugin": refusal(lambda: get_plugin("seed").validate_config(config={"oops": 1})),
    }
    row_id = insert_row(msg)
    row = get_db().execute("SELECT msg FROM seed_row WHERE id = :i", {"i": row_id}).fetchone()
    record["row_msg"] = row.msg if row else f"no row of id {row_id!r}"
    with open(config["out"], "a") as f:
        f.write(json.dumps(record) + "\n")
