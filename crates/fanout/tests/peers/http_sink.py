"""A keep-alive HTTP/1.1 endpoint that is not hyper: Python's
ThreadingHTTPServer answering every POST with 200 and Content-Length: 0.

Usage: http_sink.py [CERT KEY] -- binds 127.0.0.1 on a free port, prints
"PORT <n>" once listening, then a line "CONN" for each connection accepted.
With CERT and KEY it serves HTTPS (the handshake runs in the accept loop,
as the standard library does it).
"""
import http.server
import ssl
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        print("CONN", flush=True)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) == 3:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[1], sys.argv[2])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print("PORT", server.server_address[1], flush=True)
server.serve_forever()
