"""The small HTTP recorder both systems' first remediation action calls: it notes when each call arrived.

Runs in its own process (`python bench/peer/recorder.py PORT OUTFILE`) on 127.0.0.1; every POST appends one
line `<time.time()> <body>` to OUTFILE and is answered 200, so "event -> first action" is the gap between the
load generator's send time and the line's time (both wall clock on the same machine).
"""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, outfile: str) -> None:
    out = open(outfile, "a", buffering=1)  # line-buffered: a reader sees each call as soon as it lands

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the name http.server dispatches to
            arrived = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            out.write(f"{arrived:.6f} {body.decode(errors='replace')}\n")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST  # ansible.builtin.uri may GET

        def log_message(self, *_: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
