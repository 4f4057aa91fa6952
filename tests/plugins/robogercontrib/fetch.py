"""A seed-style plugin that POSTs each event's message to its endpoint's
`url`, as the original's HTTP plugins did (with `urllib` here, to need
the standard library only). The tests run it through roboger-plugin-python
to see the egress policy hold for a Python module's own connections, and
a wait asked for reach the server (an HTTP 429's `Retry-After`, or, with
`later: SECONDS` in the endpoint config, an exception's `retry_after`).
With `client: requests` it POSTs with `requests` instead, whose
`raise_for_status()` HTTPError carries the answer the bridge reads.
With `hang: true` its send never returns, as one calling a target that
never answers, without a timeout, would. With `exit: true` it calls
`sys.exit(3)`, as a script turned module may.
"""

__version__ = "0.1.0"

import sys
import time
import urllib.request


def validate_config(config, **kwargs):
    if not isinstance(config.get("url"), str):
        raise ValueError("url: a URL is required")


class Later(Exception):
    """A failure that asks for a wait, as a module may raise its own."""

    def __init__(self, seconds):
        super().__init__(f"asked to wait {seconds} s")
        self.retry_after = seconds


def send(config, msg, **kwargs):
    if config.get("hang"):
        time.sleep(3600)
    if config.get("exit"):
        sys.exit(3)
    if "later" in config:
        raise Later(config["later"])
    if config.get("client") == "requests":
        import requests

        requests.post(config["url"], data=msg.encode(), timeout=5).raise_for_status()
        return
    req = urllib.request.Request(config["url"], data=msg.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()
