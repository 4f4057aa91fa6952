"""An SMTP server for the email plugin's tests (aiosmtpd, from PyPI).

Listens on 127.0.0.1 at a free port, prints "listening PORT" once ready,
and writes each message it receives to DIR as a JSON file: the envelope,
the headers, the text body and the attachments (base64). The mailbox
`unknown@...` is refused for good (550), `busy@...` for now (452), and
`later@...` for now the first time it is named, then accepted. With --login and
--password it requires SMTP AUTH with them (over plain text: loopback).
With --cert and --key (PEM files) it requires STARTTLS with that
certificate, or with --implicit-tls speaks TLS from the first byte.

    python smtp_sink.py DIR [--login L --password P] [--cert C --key K [--implicit-tls]]
"""

import argparse
import warnings
import base64
import email
import email.policy
import json
import logging
import os
import socket
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Handler:
    def __init__(self, out):
        self.out = out
        self.n = 0
        self.lock = threading.Lock()
        self.named = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # A mailbox named "unknown" does not exist; one named "busy" is
        # over its quota for now; one named "later" is not ready the first
        # time.
        local = address.split("@")[0]
        if local == "unknown":
            return "550 5.1.1 no such mailbox"
        if local == "busy":
            return "452 4.2.2 mailbox over quota, try later"
        if local == "later" and address not in self.named:
            self.named.add(address)
            return "451 4.3.0 not now, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        m = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = m.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "authenticated": bool(session.authenticated),
            # After STARTTLS, or on a connection TLS from the first byte.
            "tls": session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None,
            "headers": {k: str(v) for k, v in m.items()},
            "text": body.get_content() if body is not None else None,
            "attachments": [
                {
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "data": base64.b64encode(part.get_payload(decode=True)).decode(),
                }
                for part in m.iter_attachments()
            ],
        }
        with self.lock:
            self.n += 1
            name = os.path.join(self.out, "%04d.json" % self.n)
        with open(name + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(name + ".tmp", name)
        return "250 OK"


def main():
    warnings.simplefilter("ignore")
    if os.environ.get("SMTP_SINK_DEBUG"):  # the SMTP dialogue on stderr
        logging.basicConfig(level=logging.DEBUG)
    else:
        logging.disable(logging.CRITICAL)
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--login")
    p.add_argument("--password")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--implicit-tls", action="store_true")
    a = p.parse_args()

    kwargs = {}
    if a.login:
        def auth(server, session, envelope, mechanism, data):
            ok = data.login.decode() == a.login and data.password.decode() == a.password
            return AuthResult(success=ok, handled=False)

        kwargs = dict(authenticator=auth, auth_required=True, auth_require_tls=False)
    if a.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.cert, a.key)
        if a.implicit_tls:
            kwargs["ssl_context"] = ctx
        else:
            kwargs.update(tls_context=ctx, require_starttls=True)
    # aiosmtpd checks it is up by connecting, so it needs a real port.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = Controller(Handler(a.dir), hostname="127.0.0.1", port=port, **kwargs)
    c.start()
    print("listening", port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
