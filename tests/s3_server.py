"""moto's S3 API on localhost with a log of the requests it answered: the remote store's tests
(conftest.py s3_server) and bench/store_remote_plan.py."""

import logging
import threading


class S3Server:
    """moto's S3 API on a free port of 127.0.0.1, served by a thread of this process, with the log of
    the requests it answered from any process (a Snakemake run in a subprocess included), each as
    (method, path, query string)."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests = []

        def logged(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                  environ.get("QUERY_STRING", "")))
            return app(environ, start_response)

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = make_server("127.0.0.1", 0, logged, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def lists_and_others(self):
        """(the LIST requests of the log, every other request)."""
        lists = [r for r in self.requests if r[0] == "GET" and "list-type=2" in r[2]]
        return lists, [r for r in self.requests if r not in lists]

    def stop(self):
        self.server.shutdown()
        self.thread.join()
