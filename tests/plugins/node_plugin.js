#!/usr/bin/env node
// A Roboger plugin in JavaScript, Node's standard library only, written
// the way an author would from schema/plugin-protocol.md alone: `log`
// sent as a notification (it has no answer worth waiting for), routes
// announced with the manifest's `http` flag, callbacks for the server's
// URL and its bucket, and `send_batch` answered with JavaScript's idea of
// "no error". TEST_PLUGIN_RECORD names a file that gets one JSON line per
// `send`; NODE_PLUGIN_MANIFEST=broken leaves `name` out of the
// manifest, =error answers `hello` with an error. NODE_PLUGIN_WIRE makes
// the mistakes of a hand-written wire: =pretty writes every message
// pretty-printed over several lines, =string-ids answers
// `validate_config` with its request's id turned into a string, =no-ping
// has no `ping` (answered "method not found").
'use strict';
const fs = require('fs');
const readline = require('readline');

let nextId = 1;
const pending = new Map();
let greeting = '';

function write(msg) {
  const wire = process.env.NODE_PLUGIN_WIRE;
  process.stdout.write((wire === 'pretty' ? JSON.stringify(msg, null, 2) : JSON.stringify(msg)) + '\n');
}

function call(method, params) {
  const id = nextId++;
  write({ jsonrpc: '2.0', id, method, params });
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
}

function notify(method, params) {
  write({ jsonrpc: '2.0', method, params });
}

class RpcError extends Error {
  constructor(code, message) {
    super(message);
    this.rpcCode = code;
  }
}

const handlers = {
  hello() {
    const mode = process.env.NODE_PLUGIN_MANIFEST;
    if (mode === 'error') throw new RpcError(-32002, 'not today');
    const manifest = {
      protocol_version: '1.0', name: 'node', version: '0.1.0',
      description: 'a plugin in JavaScript',
      methods: ['validate_plugin_config', 'load', 'validate_config', 'send_batch'],
      http: true,
      config_schema: {
        type: 'object', required: ['room'],
        properties: { room: { type: 'string' }, token: { type: 'string', writeOnly: true } },
      },
    };
    if (mode === 'broken') delete manifest.name;
    return manifest;
  },
  validate_plugin_config({ plugin_config }) {
    if (typeof plugin_config.greeting !== 'string') throw new RpcError(-32001, 'greeting is required');
    return null;
  },
  load({ plugin_config }) {
    greeting = plugin_config.greeting;
    // A log line sent with its level forgotten, and one to a misspelt
    // method.
    notify('log', { message: `loaded, greeting ${greeting}` });
    notify('logg', { level: 'info', message: 'a misspelt method' });
    return null;
  },
  // Answers the way validators in other languages do, too: false, or
  // the reason as a text.
  validate_config({ config }) {
    if (!config.room) throw new RpcError(-32001, 'room is required');
    if (config.room === 'closed') return false;
    if (config.room === 'full') return 'that room is full';
    return true;
  },
  async send(p) {
    // No room for it now: the protocol's -32005, the work not done.
    if (p.config.busy) throw new RpcError(-32005, 'no room now');
    notify('log', { level: 'warning', message: `node sends ${p.event_id} to ${p.config.room}` });
    const url = await call('get_url', {});
    let object = null;
    if (p.media_encoded) {
      object = await call('bucket_put', { content: p.media_encoded, addr_id: p.addr_id, public: true });
    }
    const record = { method: 'send', event_id: p.event_id, msg: p.msg, level_name: p.level_name, url, object };
    fs.appendFileSync(process.env.TEST_PLUGIN_RECORD, JSON.stringify(record) + '\n');
    return null;
  },
  // Each event's outcome as its endpoint config says (`outcome`), as a
  // hand-written plugin might answer it: null, true, {}, {error: "text"}.
  // An event whose config has `whole` has the whole batch answered that.
  send_batch({ events }) {
    const whole = events.find((e) => 'whole' in e.config);
    if (whole) return whole.config.whole;
    return events.map((e) => ('outcome' in e.config ? e.config.outcome : null));
  },
  http({ method, path }) {
    if (path === '/hello') {
      const body = Buffer.from(`${greeting} from node, ${method}`).toString('base64');
      return { status: 200, headers: { 'content-type': 'text/plain' }, body };
    }
    if (path === '/plain') return { status: 200, body: 'not base64!' };
    return { status: 404, body: '' };
  },
  ping() {
    return null;
  },
};

async function serve(msg) {
  const noPing = process.env.NODE_PLUGIN_WIRE === 'no-ping' && msg.method === 'ping';
  const handler = noPing ? undefined : handlers[msg.method];
  if (!handler) {
    write({ jsonrpc: '2.0', id: msg.id, error: { code: -32601, message: 'method not found' } });
    return;
  }
  const id = process.env.NODE_PLUGIN_WIRE === 'string-ids' && msg.method === 'validate_config'
    ? String(msg.id) : msg.id;
  try {
    write({ jsonrpc: '2.0', id, result: await handler(msg.params || {}) });
  } catch (e) {
    write({ jsonrpc: '2.0', id, error: { code: e.rpcCode || -32002, message: String(e.message) } });
  }
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.method === undefined) {
    const waiting = pending.get(msg.id);
    pending.delete(msg.id);
    if (waiting && msg.error) waiting.reject(new RpcError(msg.error.code, msg.error.message));
    else if (waiting) waiting.resolve(msg.result);
  } else if (msg.id !== undefined) {
    serve(msg);
  } else if (msg.method === 'shutdown') {
    process.exit(0);
  }
});
// A plugin must exit when its stdin closes.
lines.on('close', () => process.exit(0));
