"""A seed-style plugin that POSTs each event's message to its endpoint's
`url`, as the original's HTTP plugins did (with `urllib` here, to need
the standard library only). The tests run it through roboger-plugin-python
to see the egress policy hold for a Python module's own connections.
"""

__version__ = "0.1.0"

import urllib.request


def validate_config(config, **kwargs):
    if not isinstance(config.get("url"), str):
        raise ValueError("url: a URL is required")


def send(config, msg, **kwargs):
    req = urllib.request.Request(config["url"], data=msg.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()
