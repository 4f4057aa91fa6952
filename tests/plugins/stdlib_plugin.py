#!/usr/bin/env python3
"""A Roboger plugin in plain Python (standard library only).

It speaks the plugin protocol directly: one JSON-RPC 2.0 message per line
on stdin/stdout, requests both ways at once. It behaves like the Rust test
plugin (tests/src/bin/roboger-test-plugin.rs) so both pass the same tests:
TEST_PLUGIN_RECORD names a file that gets one JSON line per call, and an
endpoint config steers `send` ({"callbacks": true}, {"slow": ms},
{"gate": "/path"}, {"fail": "msg"}, {"hang": true}, {"crash": true});
a slow or gated send records `send_started` as it begins. It logs with
the `logging` module's defaults, as a Python author would: on stderr,
`LEVEL:name:message`.
"""
import base64
import itertools
import json
import logging
import os
import sys
import threading
import time

PROTOCOL_VERSION = "1.0"
_out_lock = threading.Lock()
_pending = {}
_pending_lock = threading.Lock()
_ids = itertools.count(1)


def write(msg):
    line = json.dumps(msg, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def record(entry):
    path = os.environ.get("TEST_PLUGIN_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class RpcError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def call(_method, **params):
    """Calls the server and waits for its answer."""
    rid = next(_ids)
    done = threading.Event()
    with _pending_lock:
        _pending[rid] = [done, None]
    write({"jsonrpc": "2.0", "id": rid, "method": _method, "params": params})
    if not done.wait(10):
        raise RpcError(-32000, f"{_method}: no answer")
    with _pending_lock:
        answer = _pending.pop(rid)[1]
    if "error" in answer:
        raise RpcError(answer["error"].get("code"), answer["error"].get("message"))
    return answer.get("result")


def run_callbacks(kw):
    call("log", level="warning", message=f"callback log from event {kw['event_id']}")
    bucket_id = call("bucket_put", content=base64.b64encode(b"hello bucket").decode(),
                     addr_id=kw["addr_id"], fname="hello.txt", public=True,
                     metadata={"k": "v"}, expires=60)
    obj = call("bucket_get", object_id=bucket_id)
    call("bucket_touch", object_id=bucket_id)
    try:
        db = call("db_query", sql="SELECT 1 AS one")
    except RpcError as e:
        db = {"error": str(e)}
    try:
        other = call("call_plugin", plugin_name="other", method="validate_config",
                     params={"config": {"from": "python"}})
    except RpcError as e:
        other = {"error": str(e)}
    return {
        "timeout": call("get_timeout"), "level": call("convert_level", level="crit"),
        "url": call("get_url"),
        "limits": call("is_use_limits"), "bucket_id": bucket_id,
        "bucket_creator": obj["creator"], "bucket_mimetype": obj["mimetype"],
        "bucket_fname": obj["fname"], "bucket_content": obj["content"],
        "db": db, "call_plugin": other,
    }


def send(config, **kw):
    if config.get("gate") or config.get("slow"):
        # So a test knows this call is in flight.
        record({"method": "send_started", "pid": os.getpid(), "event_id": kw.get("event_id")})
    if config.get("crash"):
        os._exit(1)
    if config.get("hang"):
        time.sleep(3600)
    if config.get("slow"):
        time.sleep(config["slow"] / 1000)
    while config.get("gate") and not os.path.exists(config["gate"]):
        time.sleep(0.02)
    media = base64.b64decode(kw["media_encoded"]) if kw.get("media_encoded") else None
    callbacks = run_callbacks(kw) if config.get("callbacks") else None
    entry = {"method": "send", "pid": os.getpid(), "config": config, "media": list(media) if media is not None else None,
             "callbacks": callbacks}
    for k in ("event_id", "addr", "addr_id", "msg", "subject", "formatted_subject", "level", "level_name",
              "location", "tag", "sender", "media_encoded", "media_fname"):
        entry[k] = kw.get(k)
    record(entry)
    if config.get("fail"):
        raise RpcError(-32002, config["fail"])


def validate_config(config, **kw):
    record({"method": "validate_config", "config": config})
    if "reject" in config:
        raise RpcError(-32001, str(config["reject"]))


def load(plugin_config):
    record({"method": "load", "plugin_config": plugin_config})
    logging.getLogger("stdlib").warning("loaded with %s", json.dumps(plugin_config))


METHODS = {
    "hello": lambda **kw: {"protocol_version": PROTOCOL_VERSION, "name": "stdlib-python", "version": "1.0.0",
                           "description": "a plugin in plain Python",
                           "methods": ["validate_plugin_config", "load", "validate_config", "cleanup"]},
    "validate_plugin_config": lambda plugin_config=None, **kw: record(
        {"method": "validate_plugin_config", "plugin_config": plugin_config}),
    "load": lambda plugin_config=None, **kw: load(plugin_config),
    "validate_config": validate_config,
    "send": send,
    "cleanup": lambda **kw: record({"method": "cleanup"}),
    "ping": lambda **kw: None,
}


def serve(msg):
    rid = msg.get("id")
    fn = METHODS.get(msg["method"])
    if fn is None:
        write({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "method not found"}})
        return
    try:
        result = fn(**(msg.get("params") or {}))
        write({"jsonrpc": "2.0", "id": rid, "result": result})
    except RpcError as e:
        write({"jsonrpc": "2.0", "id": rid, "error": {"code": e.code, "message": str(e)}})
    except Exception as e:  # a plugin bug is the call's failure, not a crash
        write({"jsonrpc": "2.0", "id": rid, "error": {"code": -32002, "message": f"{type(e).__name__}: {e}"}})


def main():
    logging.basicConfig()
    record({"method": "start", "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if "method" in msg:
            if "id" in msg:
                threading.Thread(target=serve, args=(msg,), daemon=True).start()
            elif msg["method"] == "shutdown":
                break
        else:
            with _pending_lock:
                slot = _pending.get(msg.get("id"))
                if slot:
                    slot[1] = msg
                    slot[0].set()
    # stdin closed (or shutdown): exit, never outliving the server.
    os._exit(0)


if __name__ == "__main__":
    main()
