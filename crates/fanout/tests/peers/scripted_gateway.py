"""A scripted @connections endpoint on Python's http.server: not the
project's own stand-in, so the live-rows tests do not share its
assumptions.

Usage: scripted_gateway.py SCRIPT -- binds 127.0.0.1 on a free port and
prints "PORT <n>" once listening. SCRIPT is JSON:

  {"default": 200, "ids": {"conn-1": [410, 200]}, "html": false}

Each POST .../@connections/<id> takes the next answer listed for that id
(the last one repeats), else the default. Statuses other than 2xx carry
a body: JSON with a message, or with "html" an HTML error page, as a
misconfigured proxy or custom domain answers. GET /_posts returns
{"<id>": [statuses answered, in order]}.
"""
import http.server
import json
import sys
import threading
import urllib.parse

SCRIPT = json.loads(sys.argv[1])
POSTS = {}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        with LOCK:
            body = json.dumps(POSTS).encode()
        self.answer(200, body, "application/json")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        if length:
            self.rfile.read(length)
        path = urllib.parse.unquote(self.path)
        marker = "/@connections/"
        connection = path.split(marker, 1)[1] if marker in path else path
        with LOCK:
            answered = POSTS.setdefault(connection, [])
            listed = SCRIPT.get("ids", {}).get(connection)
            if listed:
                status = listed[min(len(answered), len(listed) - 1)]
            else:
                status = SCRIPT.get("default", 200)
            answered.append(status)
        if status < 300:
            self.answer(status, b"", "application/json")
        elif SCRIPT.get("html"):
            page = b"<html><body><h1>Not Found</h1></body></html>"
            self.answer(status, page, "text/html")
        else:
            message = json.dumps({"message": "scripted %d" % status}).encode()
            self.answer(status, message, "application/json")

    def answer(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("PORT", server.server_address[1], flush=True)
server.serve_forever()
