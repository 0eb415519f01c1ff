"""Serve the web example on 127.0.0.1 with the headers that multithreaded WebAssembly needs.

    python serve.py ARTIFACT_DIR [--port 8000]

    /           this folder (index.html, sample.js)
    /ort/       node_modules/onnxruntime-web/dist (the .mjs bundles and their .wasm; `npm install` first)
    /model/     ARTIFACT_DIR, the folder `ldmkit export onnx` wrote (sampler.json, sampler.onnx, ...)

Every response carries Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp,
which make the page cross-origin isolated: only then does the browser give WebAssembly the shared memory that
onnxruntime-web's threads need (without them it runs on one thread). Standard library only; it prints the
page's address on its first line and serves until interrupted.
"""

import argparse
import functools
import http.server
import sys
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
           "Cross-Origin-Resource-Policy": "same-origin", "Cache-Control": "no-store"}


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from three roots (see the module docstring), with the isolation headers."""

    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
        ".wasm": "application/wasm", ".onnx": "application/octet-stream", ".json": "application/json"}

    def __init__(self, *args, roots, **kwargs):
        self.roots = roots
        super().__init__(*args, directory=str(HERE), **kwargs)

    def translate_path(self, path):
        for prefix, root in self.roots.items():
            if path.startswith(prefix):
                self.directory = str(root)
                return super().translate_path("/" + path[len(prefix):])
        self.directory = str(HERE)
        return super().translate_path(path)

    def end_headers(self):
        for name, value in HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format, *args):  # quiet: errors only
        if args and str(args[1]).startswith(("4", "5")):
            super().log_message(format, *args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="the folder `ldmkit export onnx` wrote")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    args = parser.parse_args(argv)
    dist = HERE / "node_modules" / "onnxruntime-web" / "dist"
    for what, path in (("artifact folder", args.artifact), ("onnxruntime-web (run npm install here)", dist)):
        if not path.is_dir():
            print(f"error: {what} {path} is not a folder", file=sys.stderr)
            return 2
    handler = functools.partial(Handler, roots={"/ort/": dist, "/model/": args.artifact.resolve()})
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print(f"serving http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
