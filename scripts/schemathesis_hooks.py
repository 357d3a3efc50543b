"""Schemathesis hooks for scripts/ops-check.sh: sign what schemathesis sends, so generated
requests get past authentication and reach the parsers, the pipeline and the sink.

Signatures cover the exact bytes sent, which exist only once `requests` has prepared the
request, so this wraps `requests.Session.send` (schemathesis' transport) instead of editing the
generated case. A request is signed only when it carries the provider's signature header (or
token parameter): generated requests without one still test the "missing" path.

The secrets come from the environment, the same values ops-check.sh gives the gateway.
"""

import base64
import hashlib
import hmac
import json
import os
import time
import urllib.parse

import requests

ENV = os.environ
API_SECRET = ENV["SB_API_SECRET"]
TWILIO_TOKEN = ENV["SB_TWILIO_TOKEN"]
META_SECRET = ENV["SB_META_SECRET"]
TELEGRAM_TOKEN = ENV["SB_TELEGRAM_TOKEN"]
X_SECRET = ENV["SB_X_SECRET"]
INBOUND_TOKEN = ENV["SB_INBOUND_TOKEN"]
ALIBABA_TOKEN = ENV["SB_ALIBABA_TOKEN"]
WECHAT_TOKEN = ENV["SB_WECHAT_TOKEN"]
WEIBO_SECRET = ENV["SB_WEIBO_SECRET"]
VONAGE_SECRET = ENV["SB_VONAGE_SECRET"]
META_VERIFY_TOKEN = ENV["SB_META_VERIFY_TOKEN"]
PUBLIC_URL = ENV["SB_PUBLIC_URL"]


def _body(prepared):
    b = prepared.body
    if b is None:
        return b""
    return b.encode() if isinstance(b, str) else b


def _has(headers, name):
    return any(k.lower() == name for k in headers)


def _set(headers, name, value):
    for k in [k for k in headers if k.lower() == name]:
        del headers[k]
    headers[name] = value


def _hmac(key, msg, algo):
    return hmac.new(key.encode(), msg, algo)


def _with_query(url, updates):
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if k not in updates]
    query += list(updates.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _query(url):
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


def _set_body(p, body):
    p.body = body
    p.headers["Content-Length"] = str(len(body))


def _vonage(params):
    """Vonage: `timestamp` now, and `sig` = hex HMAC-SHA256 (the configured signature_method)
    over `&k=v` of every other parameter sorted, `&` and `=` in values replaced by `_`."""
    params = [(k, v) for k, v in params if k not in ("sig", "timestamp")]
    params.append(("timestamp", str(int(time.time()))))
    signing = "".join(f"&{k}={v.replace('&', '_').replace('=', '_')}" for k, v in sorted(params))
    params.append(("sig", _hmac(VONAGE_SECRET, signing.encode(), hashlib.sha256).hexdigest()))
    return params


def sign(p):
    parts = urllib.parse.urlsplit(p.url)
    path, h, body = parts.path, p.headers, _body(p)
    if path == "/v1/events" and _has(h, "x-switchboard-signature"):
        ts = str(int(time.time()))
        _set(h, "X-Switchboard-Timestamp", ts)
        sig = _hmac(API_SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        _set(h, "X-Switchboard-Signature", f"v1={sig}")
    elif path.startswith("/hooks/twilio/") and _has(h, "x-twilio-signature"):
        # Twilio: HMAC-SHA1 over the configured public URL + path + query, then every form
        # parameter sorted by name, name and value concatenated.
        url = PUBLIC_URL + path + (f"?{parts.query}" if parts.query else "")
        data = url.encode()
        ctype = next((v for k, v in h.items() if k.lower() == "content-type"), "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            try:
                params = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                params = []
            for k, v in sorted(params):
                data += (k + v).encode()
        sig = base64.b64encode(_hmac(TWILIO_TOKEN, data, hashlib.sha1).digest()).decode()
        _set(h, "X-Twilio-Signature", sig)
    elif path == "/hooks/meta" and p.method == "POST" and _has(h, "x-hub-signature-256"):
        _set(h, "X-Hub-Signature-256",
             "sha256=" + _hmac(META_SECRET, body, hashlib.sha256).hexdigest())
    elif path == "/hooks/meta" and p.method == "GET" and "hub.verify_token" in _query(p.url):
        p.url = _with_query(p.url, {"hub.verify_token": META_VERIFY_TOKEN})
    elif path == "/hooks/vonage/sms":
        ctype = next((v for k, v in h.items() if k.lower() == "content-type"), "")
        if "sig" in _query(p.url):
            p.url = urllib.parse.urlunsplit(
                parts._replace(query=urllib.parse.urlencode(_vonage(urllib.parse.parse_qsl(
                    parts.query, keep_blank_values=True)))))
        elif ctype.startswith("application/x-www-form-urlencoded"):
            try:
                params = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
            except UnicodeDecodeError:
                return
            if any(k == "sig" for k, _ in params):
                _set_body(p, urllib.parse.urlencode(_vonage(params)).encode())
        elif ctype.startswith("application/json"):
            try:
                obj = json.loads(body)
            except ValueError:
                return
            if isinstance(obj, dict) and "sig" in obj:
                flat = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in obj.items()]
                _set_body(p, json.dumps(dict(_vonage(flat))).encode())
    elif path == "/hooks/telegram" and _has(h, "x-telegram-bot-api-secret-token"):
        _set(h, "X-Telegram-Bot-Api-Secret-Token", TELEGRAM_TOKEN)
    elif path == "/hooks/x" and p.method == "POST" and _has(h, "x-twitter-webhooks-signature"):
        digest = _hmac(X_SECRET, body, hashlib.sha256).digest()
        _set(h, "X-Twitter-Webhooks-Signature", "sha256=" + base64.b64encode(digest).decode())
    elif path == "/hooks/email/inbound" and "token" in _query(p.url):
        p.url = _with_query(p.url, {"token": INBOUND_TOKEN})
    elif path.startswith("/hooks/alibaba/sms/"):
        p.url = urllib.parse.urlunsplit(parts._replace(path=f"/hooks/alibaba/sms/{ALIBABA_TOKEN}"))
    elif path in ("/hooks/wechat", "/hooks/weibo") and "signature" in _query(p.url):
        # sha1 of the sorted (token or app secret, timestamp, nonce), hex.
        q = _query(p.url)
        ts = str(int(time.time()) * (1000 if path == "/hooks/weibo" else 1))
        nonce = q.get("nonce") or "n0nce"
        key = WECHAT_TOKEN if path == "/hooks/wechat" else WEIBO_SECRET
        sig = hashlib.sha1("".join(sorted([key, ts, nonce])).encode()).hexdigest()
        p.url = _with_query(p.url, {"timestamp": ts, "nonce": nonce, "signature": sig})


_send = requests.Session.send


def _signed_send(self, request, **kwargs):
    sign(request)
    return _send(self, request, **kwargs)


requests.Session.send = _signed_send
