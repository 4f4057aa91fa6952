"""Roboger's bridge for seed-style Python plugins.

Hosts one module written for the original Roboger (`robogercontrib.NAME`,
with `send`, `validate_config`, `validate_plugin_config`, `load` and
`cleanup` taking **kwargs) as an out-of-process plugin. Before importing
it, the bridge installs a `roboger.core` module whose functions are served
by the server over this process's stdin/stdout (JSON-RPC 2.0, one message
per line), so the module runs without changing a line.

A Python thread cannot be stopped, so a call the server gave up on (a
`send` that never returns, as one to a target that never answers without
a timeout) keeps its thread. When STUCK_MAX calls have run past twice the
server's timeout, the bridge exits so that the server starts it afresh
(their deliveries are tried again), before the stuck threads take the
process's address space and no call can start at all.

Run by `roboger-plugin-python MODULE`; standard library only.
"""
import base64
import concurrent.futures
import contextlib
import email.utils
import errno
import importlib
import ipaddress
import itertools
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
import types
import urllib.parse

PROTOCOL_VERSION = "1.0"
REJECTED, FAILED, NOT_FOUND = -32001, -32002, -32004
CALL_TIMEOUT = 60.0

_stdout = sys.stdout
# The module's own print() must not corrupt the protocol: it goes to the log.
sys.stdout = sys.stderr
_out_lock = threading.Lock()
_pending = {}
_pending_lock = threading.Lock()
_ids = itertools.count(1)
_local = threading.local()
# When each call still running started (time.monotonic()), by a token.
_running = {}
_running_lock = threading.Lock()
STUCK_MAX = 32


@contextlib.contextmanager
def _running_call():
    """Counts a call as running while it runs (see `_watch_stuck`)."""
    token = object()
    with _running_lock:
        _running[token] = time.monotonic()
    try:
        yield
    finally:
        with _running_lock:
            del _running[token]


_timeout = []


def _server_timeout():
    """The server's timeout in seconds, asked once."""
    if not _timeout:
        _timeout.append(float(_call("get_timeout")))
    return _timeout[0]


def _watch_stuck():
    """Exits once STUCK_MAX calls have run past twice the server's timeout
    (the server gave up on them long before), logging why."""
    stuck_after = None
    while True:
        time.sleep(1)
        now = time.monotonic()
        with _running_lock:
            ages = [now - t for t in _running.values()]
        if stuck_after is None:
            if not any(age > 5 for age in ages):
                continue
            try:
                stuck_after = 2 * _server_timeout() + 1
            except Exception:
                continue
        stuck = sum(1 for age in ages if age > stuck_after)
        if stuck >= STUCK_MAX:
            sys.stderr.write(
                f"ERROR {stuck} calls have run past twice the server's timeout and still run "
                "(a send that never returns?): exiting, to be started afresh\n")
            sys.stderr.flush()
            os._exit(1)


def _write(msg):
    line = json.dumps(msg, separators=(",", ":"), default=str) + "\n"
    with _out_lock:
        _stdout.write(line)
        _stdout.flush()


class RpcError(Exception):
    """An error answer from the server (or one we send back)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _call(rpc_method, /, **params):
    """Calls the server and waits for its answer (`rpc_method` is
    positional-only, so a param may be called `method`)."""
    method = rpc_method
    rid = next(_ids)
    done = threading.Event()
    with _pending_lock:
        _pending[rid] = [done, None]
    _write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    if not done.wait(CALL_TIMEOUT):
        with _pending_lock:
            _pending.pop(rid, None)
        raise RpcError(FAILED, f"{method}: the server did not answer")
    with _pending_lock:
        answer = _pending.pop(rid)[1]
    if "error" in answer:
        err = answer["error"]
        raise RpcError(err.get("code"), err.get("message"))
    return answer.get("result")


# --- the egress policy ------------------------------------------------------
# The policy the server sends in `hello`, as the Rust SDK's HTTP client
# enforces it: checked at connect time on every TCP or UDP connection made
# through Python's socket module (so `requests`, `urllib`, `smtplib`...),
# a host name's addresses as they resolve. Only permitted addresses are
# connected to, so DNS rebinding cannot get around it. Native extensions
# that open sockets of their own are not covered.

DEFAULT_DENY = (
    ("169.254.0.0/16", "link-local and cloud metadata"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
)


class EgressRefused(ConnectionRefusedError):
    """A connection the egress policy refused; its text names the rule.
    An OSError, so a client tries a host name's next address."""


def _nets(entries):
    for n in entries or ():
        try:
            yield ipaddress.ip_network(n, strict=False)
        except ValueError:
            pass  # the server checks them; skipped, as the SDK does


class _Policy:
    def __init__(self, egress):
        self.deny = [(ipaddress.ip_network(n), f"{why}, denied by default") for n, why in DEFAULT_DENY]
        self.deny += [(n, "denied by the egress policy") for n in _nets(egress.get("deny"))]
        self.allow = list(_nets(egress.get("allow")))

    def refusal(self, ip):
        """Why `ip` may not be connected to, or None."""
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in n for n in self.allow if n.version == ip.version):
            return None
        for n, why in self.deny:
            if n.version == ip.version and ip in n:
                return f"egress refused: {ip} is in {n} ({why})"
        return None


_policy = _Policy({})
_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex


def _permitted(sock, address):
    """`address` with its host replaced by the first of its addresses the
    policy permits; raises EgressRefused, naming the rule, when none is."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return address
    host, port, *rest = address
    try:
        candidates = [(host, ipaddress.ip_address(host))]
    except ValueError:
        candidates = [(sa[0], ipaddress.ip_address(sa[0]))
                      for *_, sa in socket.getaddrinfo(host, port, sock.family, sock.type)]
    why = None
    for literal, ip in candidates:
        why = _policy.refusal(ip)
        if why is None:
            return (literal, port, *rest)
    raise EgressRefused(errno.ECONNREFUSED, why)


def _guarded_connect(sock, address):
    return _real_connect(sock, _permitted(sock, address))


def _guarded_connect_ex(sock, address):
    return _real_connect_ex(sock, _permitted(sock, address))


def _set_egress(egress):
    """Puts the policy `hello` carried in force."""
    global _policy
    _policy = _Policy(egress)


def _install_egress_guard():
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


def _refusal(exc):
    """The egress refusal behind a failed send, if any, found along the
    exception's chain (clients wrap it: `urllib`'s URLError has it as its
    reason, `requests` and `urllib3` as a cause)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EgressRefused):
            return str(exc.strerror)
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "reason", None)
        if not isinstance(exc, BaseException):
            exc = None
    return None


# --- roboger.core ---------------------------------------------------------

class _StderrHandler(logging.Handler):
    """One line per record, led by its level: the server copies plugin
    stderr into its log at that level."""

    def emit(self, record):
        try:
            text = self.format(record).replace("\n", "\n    ")
            sys.stderr.write(f"{record.levelname} {text}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


logger = logging.getLogger("roboger")
logger.setLevel(logging.DEBUG)
logger.addHandler(_StderrHandler())
logger.propagate = False


def log_traceback(*args, **kwargs):
    """Logs the exception being handled, with its traceback."""
    logger.error(traceback.format_exc().rstrip())


def get_timeout():
    return _call("get_timeout")


def convert_level(level):
    return _call("convert_level", level=level)


def is_use_limits():
    return _call("is_use_limits")


def is_use_lastrowid():
    return _call("is_use_lastrowid")


def get_real_ip():
    """The client IP of the HTTP request being served, if any."""
    req = getattr(_local, "request", None)
    return req.remote_addr if req is not None else None


def bucket_put(content, creator=None, addr_id=None, mimetype=None, fname=None,
               public=False, metadata=None, expires=None, **kwargs):
    """Stores an object; returns its id. The server sets the creator
    (`plugin.NAME`) whatever is passed."""
    if isinstance(content, str):
        content = content.encode()
    return _call("bucket_put", content=base64.b64encode(bytes(content)).decode(),
                 addr_id=addr_id, mimetype=mimetype, fname=fname, public=bool(public),
                 metadata=metadata, expires=expires)


def bucket_get(object_id, public=None, **kwargs):
    """The object as a dict (`content` as bytes); KeyError when missing
    or expired, as the original's lookup failed."""
    try:
        obj = _call("bucket_get", object_id=object_id, public=public)
    except RpcError as e:
        if e.code == NOT_FOUND:
            raise KeyError(object_id) from None
        raise
    obj["content"] = base64.b64decode(obj["content"])
    return obj


def bucket_touch(object_id, **kwargs):
    _call("bucket_touch", object_id=object_id)


def bucket_delete(object_id, **kwargs):
    _call("bucket_delete", object_id=object_id)


class _PluginProxy:
    """Another plugin: each attribute is a function calling that plugin's
    method with the keyword arguments."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, method):
        if method.startswith("__"):
            raise AttributeError(method)

        def call(**params):
            return _call("call_plugin", plugin_name=self._name, method=method, params=params)

        return call


def get_plugin(plugin_name):
    return _PluginProxy(plugin_name)


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=10, thread_name_prefix="spawn")


def spawn(method, *args, **kwargs):
    """Runs `method` in a thread pool; returns its Future."""
    return _pool.submit(method, *args, **kwargs)


class _Row(dict):
    """A result row: by key, by attribute or by position."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __getitem__(self, k):
        if isinstance(k, int):
            return list(self.values())[k]
        return dict.__getitem__(self, k)


class _Result:
    def __init__(self, rows, rowcount):
        self._rows = [_Row(r) for r in rows]
        self.rowcount = rowcount
        self.lastrowid = None

    def fetchall(self):
        rows, self._rows = self._rows, []
        return rows

    def fetchone(self):
        return self._rows.pop(0) if self._rows else None

    first = fetchone

    def __iter__(self):
        return iter(self.fetchall())


_QUERY = re.compile(r"^\s*(select|with|pragma|show|values)\b|\breturning\b", re.I)
_INSERT = re.compile(r"^\s*(insert|replace)\b", re.I)


class _Connection:
    """What `get_db()` returns instead of a SQLAlchemy connection:
    `execute(sql, params)` with `:named` parameters (SQLAlchemy `text()`
    style, as a dict or keyword arguments), through the server's
    `db_query`/`db_execute` (the plugin needs `db: true`); an INSERT's
    result has `lastrowid` (`db_insert`)."""

    def execute(self, sql, params=None, **kwargs):
        params = dict(params or {}, **kwargs)
        sql = str(sql)
        if _QUERY.search(sql):
            rows = _call("db_query", sql=sql, params=params)
            return _Result(rows, len(rows))
        if _INSERT.search(sql):
            # lastrowid, for databases without RETURNING (is_use_lastrowid)
            done = _call("db_insert", sql=sql, params=params)
            result = _Result([], done["rows_affected"])
            result.lastrowid = done.get("last_insert_id")
            return result
        return _Result([], _call("db_execute", sql=sql, params=params))

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Engine(_Connection):
    def connect(self):
        return _Connection()


def get_db():
    return _Connection()


def get_db_engine():
    return _Engine()


class _Request:
    """The HTTP request being served by a route of `get_app()`."""

    def __init__(self, method, path, query, headers, body, client_ip):
        self.method = method
        self.path = path
        self.query_string = query.encode()
        self.args = dict(urllib.parse.parse_qsl(query))
        self.headers = headers
        self.data = body
        self.remote_addr = client_ip

    def get_data(self, as_text=False):
        return self.data.decode() if as_text else self.data

    def get_json(self, force=False, silent=False):
        try:
            return json.loads(self.data or b"null")
        except ValueError:
            if silent:
                return None
            raise


class _Ctx:
    def __getattr__(self, k):
        req = getattr(_local, "request", None)
        if req is None:
            raise RuntimeError("no HTTP request is being served")
        return getattr(req, k)


request = _Ctx()


class _App:
    """What `get_app()` returns instead of the Flask app: `route` and
    `add_url_rule` register handlers for `/plugin/NAME/...` (the
    `/plugin/NAME` prefix of a rule may be left out); `<var>` parts become
    keyword arguments. A handler returns a str, bytes, a dict or list
    (sent as JSON), or a tuple (body, status[, headers]), as in Flask;
    `roboger.core.request` is the request."""

    def __init__(self):
        self.rules = []

    def add_url_rule(self, rule, endpoint=None, view_func=None, methods=None, **kwargs):
        path = re.sub(r"^/plugin/[^/]+", "", rule) or "/"
        pattern = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"(?P<\1>[^/]+)", re.escape(path))
        self.rules.append((re.compile(f"^{pattern}$"), {m.upper() for m in (methods or ["GET"])}, view_func))

    def route(self, rule, methods=None, **kwargs):
        def wrap(fn):
            self.add_url_rule(rule, view_func=fn, methods=methods)
            return fn

        return wrap

    def serve(self, req):
        allowed = False
        for pattern, methods, fn in self.rules:
            m = pattern.match(req.path)
            if m:
                if req.method not in methods:
                    allowed = True
                    continue
                return _response(fn(**m.groupdict()))
        return {"status": 405 if allowed else 404, "headers": {}, "body": ""}


_app = _App()


def get_app():
    return _app


def _response(value):
    status, headers = 200, {}
    if isinstance(value, tuple):
        value, status, *rest = value
        headers = dict(rest[0]) if rest else {}
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
        headers.setdefault("Content-Type", "application/json")
    if value is None:
        value = b""
    if isinstance(value, str):
        value = value.encode()
        headers.setdefault("Content-Type", "text/html; charset=utf-8")
    return {"status": int(status), "headers": {str(k): str(v) for k, v in headers.items()},
            "body": base64.b64encode(value).decode()}


def _install_core():
    core = types.ModuleType("roboger.core")
    for name in ("logger", "log_traceback", "get_timeout", "convert_level", "is_use_limits",
                 "is_use_lastrowid", "get_real_ip", "bucket_put", "bucket_get", "bucket_touch",
                 "bucket_delete", "get_plugin", "spawn", "get_db", "get_db_engine", "get_app",
                 "request"):
        setattr(core, name, globals()[name])
    pkg = types.ModuleType("roboger")
    pkg.__path__ = []
    pkg.core = core
    sys.modules["roboger"] = pkg
    sys.modules["roboger.core"] = core


# --- the plugin side of the protocol ----------------------------------------

OPTIONAL = ("validate_plugin_config", "load", "validate_config", "cleanup")


def _send_one(module, params):
    """The module's send; a send that failed on an egress refusal is
    refused (`REJECTED`: not retried), naming the rule."""
    enc = params.get("media_encoded")
    params["media"] = base64.b64decode(enc) if enc else None
    try:
        module.send(**params)
    except RpcError:
        raise
    except Exception as e:
        why = _refusal(e)
        if why is None:
            raise
        raise RpcError(REJECTED, why) from e


def _retry_after(exc):
    """The wait a failed send's target asked for, in seconds, or None:
    a `retry_after` number on the exception, else a 429 or 503 answer's
    `Retry-After` (seconds or an HTTP-date) on the exception or along its
    chain, as `requests`' HTTPError (`.response`) and `urllib`'s
    (`.code`, `.headers`) carry it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        wait = getattr(exc, "retry_after", None)
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
            return float(wait)
        # A `requests` answer of 429 is falsy: compared with None.
        resp = getattr(exc, "response", None)
        if resp is None:
            resp = exc
        status = getattr(resp, "status_code", None) or getattr(resp, "code", None)
        headers = getattr(resp, "headers", None)
        if status in (429, 503) and headers is not None:
            value = (headers.get("Retry-After") or "").strip()
            if value.isdigit():
                return float(value)
            try:
                at = email.utils.parsedate_to_datetime(value).timestamp()
                return max(at - time.time(), 0.0)
            except (TypeError, ValueError, IndexError):
                pass
        exc = exc.__cause__ or exc.__context__
        if not isinstance(exc, BaseException):
            exc = None
    return None


def _failure(e):
    """A failed send as a JSON-RPC error object: FAILED, with the wait
    its target asked for as `data.retry_after`. `sys.exit()` and the
    like (not an `Exception`) are named: their text alone is a code."""
    if isinstance(e, Exception):
        message = str(e) or type(e).__name__
    else:
        message = f"the module raised {type(e).__name__}({e})"
    error = {"code": FAILED, "message": message}
    wait = _retry_after(e)
    if wait is not None:
        error["data"] = {"retry_after": wait}
    return error


def _send_batch(module, events):
    """`send_batch`: the module's send for each event at once (a thread
    each, as separate `send` calls would have); one outcome per event,
    answered just before the server's timeout at the latest."""
    outcomes = [None] * len(events)

    def one(i, params):
        try:
            with _running_call():
                _send_one(module, dict(params))
            outcomes[i] = {}
        except RpcError as e:
            outcomes[i] = {"error": {"code": e.code, "message": str(e)}}
        # Not only Exception: a SystemExit would end the thread unseen,
        # and the batch would wait out its deadline for this outcome.
        except BaseException as e:
            logger.debug(traceback.format_exc().rstrip())
            outcomes[i] = {"error": _failure(e)}

    try:
        limit = 0.95 * _server_timeout()
    except Exception:
        limit = 4.75
    deadline = time.monotonic() + limit
    threads = [threading.Thread(target=one, args=(i, p), daemon=True) for i, p in enumerate(events)]
    for t in threads:
        t.start()
    # The server gives up on the whole batch at its timeout: a send still
    # running just before then fails alone (its thread runs on; see
    # _watch_stuck), and the others' outcomes reach the server.
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = {"error": {"code": FAILED, "message":
                      f"the send did not finish within {limit:.2f} s, just under the server's timeout"}}
    return [late if o is None else o for o in outcomes]


def _serve(module, msg):
    with _running_call():
        _serve_call(module, msg)


def _serve_call(module, msg):
    rid, method = msg.get("id"), msg["method"]
    params = msg.get("params") or {}
    try:
        if method == "hello":
            _set_egress(params.get("egress") or {})
            name = module.__name__.rsplit(".", 1)[-1]
            result = {
                "protocol_version": PROTOCOL_VERSION, "name": name,
                "version": str(getattr(module, "__version__", "")) or None,
                "description": getattr(module, "__description__", None) or (module.__doc__ or "").strip().split("\n")[0] or None,
                "url": getattr(module, "__url__", None),
                "methods": [m for m in OPTIONAL if callable(getattr(module, m, None))] + ["send_batch", "http"],
                "http": True,
            }
        elif method == "ping":
            result = None
        elif method == "send":
            _send_one(module, params)
            result = None
        elif method == "send_batch":
            result = _send_batch(module, params.get("events") or [])
        elif method == "http":
            req = _Request(params.get("method", "GET"), params.get("path", "/"), params.get("query", ""),
                           params.get("headers") or {}, base64.b64decode(params.get("body") or ""),
                           params.get("client_ip"))
            _local.request = req
            try:
                result = _app.serve(req)
            finally:
                _local.request = None
        elif method in OPTIONAL and callable(getattr(module, method, None)):
            getattr(module, method)(**params)
            result = None
        else:
            raise RpcError(-32601, f"method not found: {method}")
        _write({"jsonrpc": "2.0", "id": rid, "result": result})
    except RpcError as e:
        _write({"jsonrpc": "2.0", "id": rid, "error": {"code": e.code, "message": str(e)}})
    # Every call is answered, even one whose module raised SystemExit
    # (which would end this thread unseen and leave the server waiting).
    except BaseException as e:
        # Checks that raise are the user's 400; anything else failed.
        if method in ("validate_config", "validate_plugin_config"):
            error = {"code": REJECTED, "message": str(e) or type(e).__name__}
        else:
            logger.debug(traceback.format_exc().rstrip())
            error = _failure(e)
        _write({"jsonrpc": "2.0", "id": rid, "error": error})


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("ERROR usage: roboger-plugin-python MODULE (e.g. robogercontrib.foo)\n")
        sys.exit(2)
    _install_core()
    _install_egress_guard()
    try:
        module = importlib.import_module(sys.argv[1])
    except Exception:
        sys.stderr.write(f"ERROR cannot import {sys.argv[1]}: " + traceback.format_exc().replace("\n", "\n    ") + "\n")
        sys.exit(1)
    if not callable(getattr(module, "send", None)):
        sys.stderr.write(f"ERROR {sys.argv[1]} has no send function\n")
        sys.exit(1)
    threading.Thread(target=_watch_stuck, daemon=True).start()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if "method" in msg:
            if "id" in msg:
                threading.Thread(target=_serve, args=(module, msg), daemon=True).start()
            elif msg["method"] == "shutdown":
                break
        else:
            with _pending_lock:
                slot = _pending.get(msg.get("id"))
                if slot:
                    slot[1] = msg
                    slot[0].set()
    # stdin closed (or shutdown): exit at once, never outliving the server.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
