"""Fills a database the way Roboger 2.0.45 itself does, through its own
core: it creates the original's tables on the database named by argv[1]
(an SQLAlchemy URL), then an address with a webhook endpoint (to the URL
in argv[2]) and two subscriptions, a Telegram endpoint whose chat id is
the original plugin's code for the bot token in argv[3] and chat argv[4],
and two bucket objects, one public and one already expired. Prints what
it made as JSON, for the test to find again through ours.
"""
import json
import os
import sys
import tempfile
import time

config = tempfile.NamedTemporaryFile('w', suffix='.yml', delete=False)
config.write('roboger:\n  db: ' + json.dumps(sys.argv[1]) + '\n  master:\n    key: mk\n  plugins:\n    - name: webhook\n')
config.close()

from pyaltt2.crypto import Rioja  # noqa: E402
from roboger import core  # noqa: E402

core.load(config.name)
os.unlink(config.name)

addr_id = core.addr_create()
addr = core.addr_get(addr_id=addr_id)['a']
endpoint = core.endpoint_create('webhook', addr_id=addr_id,
                                config={'url': sys.argv[2],
                                        'template': '{"m": $msg, "l": $level}'},
                                description='from 2.0.45')
by_sender = core.subscription_create(endpoint, sender='bot1', level=30,
                                     level_match='ge')
below = core.subscription_create(endpoint, level=20, level_match='l')
# The statement the original's endpoint_create runs, as its Telegram plugin
# (which registers with the Bot API when it loads) is not loaded here; the
# code is what the plugin's /start answers with (Rioja keyed by the token).
telegram = core.get_db().qcreate(
    'endpoint.create', addr_id=addr_id, addr=None, plugin='telegram',
    config=json.dumps({'chat_id': Rioja(sys.argv[3]).encrypt(sys.argv[4])}),
    description='a chat')
core.subscription_create(telegram, sender='bot1', level=10)
public = core.bucket_put(b'kept from 2.0.45', 'fill', addr_id,
                         mimetype='text/plain', fname='kept.txt', public=True,
                         metadata={'origin': 'original'}, expires=3600)
expired = core.bucket_put(b'gone', 'fill', addr_id, mimetype='text/plain',
                          public=True, expires=0)
time.sleep(0.01)
print(json.dumps({'addr_id': addr_id, 'addr': addr, 'endpoint': endpoint,
                  'telegram': telegram,
                  'by_sender': by_sender, 'below': below, 'public': public,
                  'expired': expired}))
