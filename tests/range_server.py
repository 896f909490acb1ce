"""A local HTTP server that serves PAYLOAD and honours Range requests (resumed downloads); the
`server` fixture (tests/conftest.py) runs it on 127.0.0.1. Tests change what it serves by
monkeypatching RangeHandler.do_GET."""

import http.server

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class RangeHandler(http.server.BaseHTTPRequestHandler):
    requests = []

    def do_GET(self):
        rng = self.headers.get("Range")
        RangeHandler.requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
