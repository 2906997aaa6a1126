#!/usr/bin/env python3
"""The WebSocket API's request templates, rendered and sent as API Gateway
would: the Velocity templates of config/cloudformation.yaml (the routes of
CreateWebSocketApi) rendered by airspeed, a Velocity engine for Python, with
small stand-ins for API Gateway's $util, $input and $context; the result
POSTed as the real DynamoDB request (SigV4-signed, X-Amz-Target) to the
endpoint given (dynalite in the tests).

    ws_templates.py render ROUTE [options]        the rendered request, and
                                                  with --endpoint its answer
    ws_templates.py hostile --endpoint URL --table T
                                                  hostile channel names and user
                                                  ids: each gives a valid item
                                                  or a refused request, never
                                                  a malformed request or an
                                                  injected attribute

Run with the emulators' venv (.local/venv, scripts/emulators.sh install
pins airspeed there); crates/fanout/tests/websocket_stack.rs drives it.

What each stand-in models, from AWS's documentation:

- $context.connectionId, $context.connectedAt ("the Epoch-formatted
  connection time", in milliseconds as requestContext.connectedAt),
  $context.authorizer.principalId and $context.authorizer.PROPERTY ("the
  stringified value of the specified key-value pair of the context map
  returned from an API Gateway Lambda authorizer"): "WebSocket API mapping
  template reference for API Gateway". Without an authorizer they are null.
- $input.params(x) (the value of a path, query string or header parameter,
  here the $connect URL's query string), $input.path(x) (a JSONPath
  expression's result as an object: a string for a JSON string),
  $input.json(x) (the result serialized as JSON): "Variables for data
  transformations for API Gateway", $input variables. Only `$.field`
  paths are used.
- $util.escapeJavaScript(s): "Escapes the characters in a string using
  JavaScript string rules. Note: this function will turn any regular single
  quotes (') into escaped ones (\\'). However, the escaped single quotes are
  not valid in JSON." (same page, $util variables). API Gateway runs it on
  Java: Apache Commons Lang 2's StringEscapeUtils.escapeJavaScript, which
  also escapes " \\ / and control characters, and writes every character
  above 0x7f as \\uXXXX (UTF-16 units, upper-case hex). Modelled below.
- java.lang.String methods the templates call: length() counts UTF-16
  units (Java's String.length()), startsWith(), replaceAll(regex, repl).
  airspeed maps them onto Python's str; length is corrected here.
- Arithmetic: Velocity divides integers as integers; airspeed's `/` is
  floor division, the same for the positive epoch times used here. The
  test checks the TTL renders as an integer.
"""

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request

import airspeed
from cfn_template import template


ROUTES = {
    "connect": ("WebSocketConnectIntegration", "PutItem"),
    "disconnect": ("WebSocketDisconnectIntegration", "DeleteItem"),
    "subscribe": ("WebSocketSubscribeIntegration", "PutItem"),
    "unsubscribe": ("WebSocketUnsubscribeIntegration", "DeleteItem"),
}

# Seconds past the connection's start after which TTL may remove a row:
# API Gateway's 2-hour limit plus one hour (the templates' 10800).
TTL_AFTER_START_S = 3 * 3600


# --- The template -------------------------------------------------------------




def request_template(route, table, overrides=None, tpl=None):
    """The route's request template with the stack's parameters (their
    defaults, then `overrides`) and the table's name put in, as
    CloudFormation's !Sub does."""
    tpl = tpl or template()
    params = {k: str(v.get("Default", "")) for k, v in tpl["Parameters"].items()}
    params.update(overrides or {})
    logical, _ = ROUTES[route]
    sub = tpl["Resources"][logical]["Properties"]["RequestTemplates"]["$default"]["!Sub"]
    text, names = sub
    values = {**params, **{k: table for k in names}}

    def put(match):
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{logical}: ${{{name}}} is neither a parameter nor a !Sub name")
        return values[name]

    return re.sub(r"\$\{([A-Za-z0-9_:.]+)\}", put, text)


# --- Stand-ins for API Gateway's variables ------------------------------------


def _java_length(s):
    return len(s.encode("utf-16-le")) // 2


airspeed.__additional_methods__[str]["length"] = _java_length


def escape_javascript(s):
    """Commons Lang 2 StringEscapeUtils.escapeJavaScript, over UTF-16 units."""
    if s is None:
        return None
    out = []
    units = s.encode("utf-16-le")
    for i in range(0, len(units), 2):
        ch = units[i] | (units[i + 1] << 8)
        if ch > 0x7F:
            out.append("\\u%04X" % ch)
        elif ch < 32:
            out.append({8: "\\b", 10: "\\n", 9: "\\t", 12: "\\f", 13: "\\r"}.get(ch, "\\u%04X" % ch))
        else:
            c = chr(ch)
            out.append({"'": "\\'", '"': '\\"', "\\": "\\\\", "/": "\\/"}.get(c, c))
    return "".join(out)


class Util:
    def escapeJavaScript(self, s):  # noqa: N802 (API Gateway's name)
        return escape_javascript(s)


class Input:
    def __init__(self, body=None, query=None):
        self._body = body
        self._query = query or {}

    def _select(self, path):
        if path == "$":
            return json.loads(self._body)
        m = re.fullmatch(r"\$\.([A-Za-z0-9_]+)", path)
        if not m:
            raise ValueError(f"the stand-in knows $ and $.field paths only, not {path}")
        try:
            doc = json.loads(self._body)
        except (TypeError, ValueError):
            return None
        return doc.get(m.group(1)) if isinstance(doc, dict) else None

    def params(self, name):
        return self._query.get(name)

    def path(self, path):
        return self._select(path)

    def json(self, path):
        value = self._select(path)
        return "" if value is None else json.dumps(value)


def render(route, table, connection_id, connected_at, body=None, query=None, authorizer=None,
           overrides=None):
    text = request_template(route, table, overrides)
    context = {
        "connectionId": connection_id,
        "connectedAt": connected_at,
        "authorizer": dict(authorizer or {}),
        "routeKey": {"connect": "$connect", "disconnect": "$disconnect"}.get(route, route),
    }
    return airspeed.Template(text).merge({"context": context, "input": Input(body, query), "util": Util()})


# --- DynamoDB, as API Gateway's integration calls it --------------------------


def call(endpoint, operation, body_text):
    """POSTs `body_text` unchanged as DynamoDB's `operation`, signed with
    SigV4; returns (HTTP status, decoded answer)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    data = body_text.encode("utf-8")
    request = AWSRequest(
        method="POST",
        url=endpoint.rstrip("/") + "/",
        data=data,
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": f"DynamoDB_20120810.{operation}",
        },
    )
    creds = Credentials(os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                        os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))
    SigV4Auth(creds, "dynamodb", os.environ.get("AWS_REGION", "us-east-1")).add_auth(request)
    prepared = urllib.request.Request(request.url, data=data, headers=dict(request.headers), method="POST")
    try:
        with urllib.request.urlopen(prepared, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def rows_of(endpoint, table, connection_id):
    """Every row of one connection, sk → item."""
    status, answer = call(endpoint, "Query", json.dumps({
        "TableName": table,
        "KeyConditionExpression": "#k = :id",
        "ExpressionAttributeNames": {"#k": "connectionId"},
        "ExpressionAttributeValues": {":id": {"S": connection_id}},
        "ConsistentRead": True,
    }))
    if status != 200:
        raise RuntimeError(f"Query {table}: {status} {answer}")
    return {item["sk"]["S"]: item for item in answer["Items"]}


def render_and_send(route, endpoint, table, **kw):
    rendered = render(route, table, **kw)
    out = {"rendered": rendered}
    try:
        json.loads(rendered)
        out["json"] = True
    except ValueError as err:
        out["json"] = False
        out["error"] = str(err)
        return out
    if endpoint:
        status, answer = call(endpoint, ROUTES[route][1], rendered)
        out["status"], out["answer"] = status, answer
    return out


# --- Hostile input -------------------------------------------------------------

ODD = [
    "o'brien",
    'say "hi"',
    "back\\slash",
    "\\'",
    "\\\\'\\",
    "'\"}}, \"admin\": {\"S\": \"1\"}, \"x\": {\"S\": \"",
    "\"}, \"sk\": {\"S\": \"#conn",
    "Zoë 🙂 日本語 \u2028\u2029",
    "tab\there\nnew line\r\x01\x1f",
    "$context.connectionId #set($x = 1) ${AWS::Region}",
    "</script><script>alert(1)</script>",
    "/slashes//",
]


def hostile_cases():
    """(name, route, inputs, expected): expected is "item" (exactly these
    attributes with exactly these values), "refused" (DynamoDB refuses it,
    nothing is written) or "either" (a key too long for DynamoDB, where the
    emulator may be more lenient than AWS: one or the other, never wrong)."""
    cases = []
    for n, odd in enumerate(ODD):
        cases.append((f"connect, user id {odd!r}", "connect",
                      {"authorizer": {"principalId": odd}}, "item"))
        cases.append((f"connect, channel public.{odd!r}", "connect",
                      {"query": {"channel": "public." + odd}}, "item"))
        cases.append((f"subscribe, channel public.{odd!r}", "subscribe",
                      {"body": json.dumps({"action": "subscribe", "channel": "public." + odd})}, "item"))
        cases.append((f"subscribe, authorizer prefix {odd!r}", "subscribe",
                      {"authorizer": {"channelPrefix": odd + "."},
                       "body": json.dumps({"action": "subscribe", "channel": odd + ".inbox"})}, "item"))
    cases += [
        ("connect, no user, no channel", "connect", {}, "item"),
        ("connect, channel not open", "connect", {"query": {"channel": "admin"}}, "refused"),
        ("connect, another user's channel", "connect",
         {"authorizer": {"principalId": "alice", "channelPrefix": "user.alice."},
          "query": {"channel": "user.bob.inbox"}}, "refused"),
        ("connect, own channel", "connect",
         {"authorizer": {"principalId": "alice", "channelPrefix": "user.alice."},
          "query": {"channel": "user.alice.inbox"}}, "item"),
        ("connect, channel of 256 characters", "connect",
         {"query": {"channel": "public." + "x" * 249}}, "item"),
        ("connect, channel of 257 characters", "connect",
         {"query": {"channel": "public." + "x" * 250}}, "refused"),
        ("connect, channel of 126 astral characters (259 UTF-16 units)", "connect",
         {"query": {"channel": "public." + "🙂" * 126}}, "refused"),
        ("connect, user id of 1,000 é (2,000 bytes)", "connect",
         {"authorizer": {"principalId": "é" * 1000}}, "item"),
        ("connect, user id of 5,000 bytes", "connect",
         {"authorizer": {"principalId": "u" * 5000}}, "either"),
        ("subscribe, channel not open", "subscribe",
         {"body": '{"action":"subscribe","channel":"admin"}'}, "refused"),
        ("subscribe, no public prefix and no authorizer", "subscribe",
         {"body": '{"action":"subscribe","channel":"match-42"}'}, "refused"),
        ("subscribe, a number", "subscribe", {"body": '{"action":"subscribe","channel":42}'}, "refused"),
        ("subscribe, an object", "subscribe",
         {"body": '{"action":"subscribe","channel":{"S":"public.x"}}'}, "refused"),
        ("subscribe, a list", "subscribe",
         {"body": '{"action":"subscribe","channel":["public.x"]}'}, "refused"),
        ("subscribe, true", "subscribe", {"body": '{"action":"subscribe","channel":true}'}, "refused"),
        ("subscribe, null", "subscribe", {"body": '{"action":"subscribe","channel":null}'}, "refused"),
        ("subscribe, no channel", "subscribe", {"body": '{"action":"subscribe"}'}, "refused"),
        ("subscribe, empty", "subscribe", {"body": '{"action":"subscribe","channel":""}'}, "refused"),
        ("subscribe, JSON escapes", "subscribe",
         {"body": '{"action":"subscribe","channel":"public.\\u0041\\"\\\\\\/"}'}, "item"),
        ("subscribe, 256 characters", "subscribe",
         {"body": json.dumps({"action": "subscribe", "channel": "public." + "y" * 249})}, "item"),
        ("subscribe, 257 characters", "subscribe",
         {"body": json.dumps({"action": "subscribe", "channel": "public." + "y" * 250})}, "refused"),
        ("subscribe, another user's prefix", "subscribe",
         {"authorizer": {"channelPrefix": "user.alice."},
          "body": '{"action":"subscribe","channel":"user.bob.inbox"}'}, "refused"),
        ("unsubscribe, a number", "unsubscribe", {"body": '{"action":"unsubscribe","channel":7}'}, "refused"),
    ]
    return cases


def expected_item(route, connection_id, connected_at, inputs):
    """What the templates promise to write, from the inputs alone."""
    item = {
        "connectionId": {"S": connection_id},
        "connectedAt": {"N": str(connected_at)},
        "expiresAt": {"N": str(connected_at // 1000 + TTL_AFTER_START_S)},
    }
    if route == "connect":
        item["sk"] = {"S": "#conn"}
        user = (inputs.get("authorizer") or {}).get("principalId")
        if user:
            item["userId"] = {"S": user}
        channel = (inputs.get("query") or {}).get("channel")
        if channel:
            item["channel"] = {"S": channel}
    else:
        channel = json.loads(inputs["body"])["channel"]
        item["sk"] = {"S": "ch#" + channel}
        item["channel"] = {"S": channel}
    return item


def hostile(endpoint, table):
    connected_at = 1_767_000_000_123
    failures = []
    rows = []
    for n, (name, route, inputs, expected) in enumerate(hostile_cases()):
        cid = f"hostile{n:03d}AAAAAAA="
        out = render_and_send(route, endpoint, table, connection_id=cid, connected_at=connected_at, **inputs)
        landed = rows_of(endpoint, table, cid)
        if not out["json"]:
            outcome = "MALFORMED"
        elif out["status"] == 200 and route in ("connect", "subscribe"):
            outcome = "item"
        elif out["status"] == 200:
            outcome = "deleted"
        else:
            outcome = "refused"
        problem = None
        if outcome == "MALFORMED":
            problem = f"the rendered request is not JSON: {out['error']}"
        elif outcome == "item":
            want = expected_item(route, cid, connected_at, inputs)
            (got,) = landed.values() if len(landed) == 1 else (None,)
            if got != want:
                problem = f"item {got!r} != expected {want!r}"
            elif not re.fullmatch(r"[0-9]+", got["expiresAt"]["N"]):
                problem = f"TTL {got['expiresAt']['N']!r} is not an integer"
        elif outcome == "refused" and landed:
            problem = f"refused, yet rows landed: {landed}"
        if problem is None and expected != "either" and outcome != expected:
            problem = f"{outcome}, expected {expected} ({out.get('answer')})"
        rows.append((name, outcome, problem))
        if problem:
            failures.append(f"{name}: {problem}")
    for name, outcome, problem in rows:
        print(f"  {'FAIL' if problem else 'ok  '} {outcome:8} {name}")
    print(f"hostile: {len(rows)} cases, {len(failures)} failed")
    for f in failures:
        print("  " + f)
    return not failures


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render")
    r.add_argument("route", choices=sorted(ROUTES))
    r.add_argument("--table", required=True)
    r.add_argument("--connection-id", required=True)
    r.add_argument("--connected-at", type=int, required=True)
    r.add_argument("--body")
    r.add_argument("--query", action="append", default=[], help="NAME=VALUE of the connect URL")
    r.add_argument("--principal", help="the authorizer's principalId")
    r.add_argument("--channel-prefix", help="the authorizer's context channelPrefix")
    r.add_argument("--endpoint", help="DynamoDB to send the rendered request to")
    h = sub.add_parser("hostile")
    h.add_argument("--table", required=True)
    h.add_argument("--endpoint", required=True)
    args = parser.parse_args()
    if args.command == "hostile":
        sys.exit(0 if hostile(args.endpoint, args.table) else 1)
    authorizer = {}
    if args.principal is not None:
        authorizer["principalId"] = args.principal
    if args.channel_prefix is not None:
        authorizer["channelPrefix"] = args.channel_prefix
    query = dict(q.split("=", 1) for q in args.query)
    out = render_and_send(args.route, args.endpoint, args.table, connection_id=args.connection_id,
                          connected_at=args.connected_at, body=args.body, query=query, authorizer=authorizer)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
