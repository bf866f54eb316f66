# SPDX-License-Identifier: Apache-2.0
"""Stands in for `vllm serve` in the lifecycle tests: ``fake_server.py MODE PORT PIDFILE``.

Modes: ``ok`` serves 200 on /health (and spawns a sleeping child, to check that
the whole process group is stopped); ``exit`` fails at once; ``hang`` never listens.
"""

import http.server
import subprocess
import sys
import time

mode, port, pidfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(pidfile, "w") as f:
    import os

    f.write(f"{os.getpid()} {child.pid}\n")
if mode == "exit":
    print("fake server: cannot load model", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
