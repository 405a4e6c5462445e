"""A Cloud Storage emulator on 127.0.0.1 that every gs:// client of a run can reach.

`gcp-storage-emulator` serves the GCS JSON and XML APIs over plain HTTP. Three
clients read and write a psch-jax work directory on gs://, and each is pointed at
it differently:

- TensorStore (Orbax's array writer): `TENSORSTORE_GCS_HTTP_URL` replaces
  https://storage.googleapis.com. It sends no credentials when it finds none;
  `GCE_METADATA_ROOT` points its metadata-server probe at a closed local port
  so that probe fails at once instead of timing out.
- tf.io.gfile (what `etils.epath` uses for gs:// when TensorFlow is installed,
  and so what our io_utils and Orbax's directory operations use): its GCS file
  system has no endpoint setting. The base URLs https://www.googleapis.com/...
  and https://storage.googleapis.com are compiled in (tsl
  platform/cloud/gcs_file_system.cc; `strings` on libtensorflow_framework.so
  finds no emulator variable), and `STORAGE_EMULATOR_HOST` /
  `CLOUD_STORAGE_EMULATOR_ENDPOINT` are not read. Its libcurl does honour
  `https_proxy` and `CURL_CA_BUNDLE`, so this module also runs an HTTPS
  CONNECT proxy that terminates TLS with a throw-away certificate for those
  two host names and relays the plain HTTP to the emulator.
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives TF a bearer token without a metadata
  server. Every request then reaches the emulator over the real TF code path.
- Python clients that read `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage)
  get it too, although none is installed here.

Run as a script (`python tests/gcs_emulator.py --ready-file F --bucket B
--cert C --key K`) it serves until killed and writes {"http_port",
"proxy_port"} into F when it listens; `running_emulator` starts it in a
subprocess, sets the variables above and stops it.
"""
import contextlib
import functools
import http.server
import json
import os
import select
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

from absl import app
from absl import flags

# The host names TF's GCS file system sends requests to.
GOOGLE_STORAGE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


class _EmulatorHTTPServer(http.server.HTTPServer):
  # The emulator serves one request at a time; TensorStore opens up to 32
  # connections at once, which must wait in the listen queue, not be refused.
  request_queue_size = 256


class _TLSRelay(socketserver.BaseRequestHandler):
  """Answers one CONNECT, terminates TLS, relays bytes to the emulator."""
  server: "_ProxyServer"

  def handle(self):
    request = b""
    while b"\r\n\r\n" not in request:
      chunk = self.request.recv(4096)
      if not chunk:
        return
      request += chunk
    method, target = request.split(b" ", 2)[:2]
    if method == b"CONNECT":
      host = target.decode().rsplit(":", 1)[0]
    else:  # A plain-HTTP proxy request "PUT http://host/path HTTP/1.1".
      host = target.decode().split("://", 1)[-1].split("/", 1)[0]
    if host not in GOOGLE_STORAGE_HOSTS:
      print(f"proxy: refused {request.splitlines()[0]!r}", file=sys.stderr, flush=True)
      self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    upstream = socket.create_connection(("127.0.0.1", self.server.http_port))
    # The relay forwards small writes (headers, then body) as they come: without
    # TCP_NODELAY, Nagle's algorithm holds each one for the peer's delayed ACK.
    for sock in (self.request, upstream):
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
      if method == b"CONNECT":
        self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client = self.server.tls.wrap_socket(self.request, server_side=True)
        try:
          _pipe(client, upstream)
        finally:
          with contextlib.suppress(OSError, ValueError):
            client.unwrap()
      else:
        # The emulator answers an upload with a Location on http://<Host>/...;
        # forward that request with its path only, as an origin server expects.
        origin_form = b"/" + target.split(b"://", 1)[1].split(b"/", 1)[1]
        upstream.sendall(request.replace(target, origin_form, 1))
        _pipe(self.request, upstream)
    finally:
      upstream.close()


def _pipe(client: socket.socket, upstream: socket.socket) -> None:
  """Copies bytes both ways until the emulator (HTTP/1.0: one response per
  connection) or the client closes."""
  while True:
    # SSL sockets may hold decrypted bytes that select() cannot see.
    pending = isinstance(client, ssl.SSLSocket) and client.pending()
    readable = [client] if pending else select.select(
        [client, upstream], [], [], 60)[0]
    if not readable:
      return
    for sock in readable:
      data = sock.recv(65536)
      if not data:
        return
      (upstream if sock is client else client).sendall(data)


class _ProxyServer(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 256

  def __init__(self, http_port: int, cert: str, key: str):
    super().__init__(("127.0.0.1", 0), _TLSRelay)
    self.http_port = http_port
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(cert, key)


def _fix_emulator(server_module, objects_module) -> None:
  """Three fixes to gcp-storage-emulator 2026.7.19 where it differs from GCS.

  Downloads carry no x-goog-generation header; GCS sends it, and TensorStore's
  conditional writes (Orbax's OCDBT manifest) need it ("Malformed
  StorageGeneration" otherwise). And two in how it reads request bodies, both
  hit by tf.io.gfile's uploads (real GCS accepts both requests):
  - a body sent with "Transfer-Encoding: chunked" and a Content-Length header
    (libcurl's PUT from a file) is chunked (RFC 9112 6.3: Transfer-Encoding
    wins); the emulator read Content-Length bytes of the chunk framing;
  - an empty media upload (TF's directory marker "dir/") is an empty object;
    the emulator failed on len(None).
  """
  read_raw, read = server_module._read_raw_data, server_module._read_data  # pylint: disable=protected-access

  def read_raw_data(handler):
    encoding = handler.headers.get("Transfer-Encoding", "")
    if encoding.lower() == "chunked" and handler.headers.get("Content-Length"):
      del handler.headers["Content-Length"]
    return read_raw(handler)

  def read_data(handler, query):
    data = read(handler, query)
    return b"" if data is None and query.get("uploadType") == ["media"] else data

  server_module._read_raw_data = read_raw_data  # pylint: disable=protected-access
  server_module._read_data = read_data  # pylint: disable=protected-access

  original_download = objects_module.download

  def download(request, response, storage, *args, **kwargs):
    original_download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  objects_module.download = download  # objects.get calls it for alt=media
  for _, methods in server_module.HANDLERS:
    for method, handler in methods.items():
      if handler is original_download:
        methods[method] = download


def _continuing(handler_class):
  """`handler_class` that answers "Expect: 100-continue" as GCS does.

  libcurl (tf.io.gfile's uploads) sends that header with a chunked body and waits up
  to 1 s for the interim "100 Continue" before sending the body anyway. The emulator
  speaks HTTP/1.0, where http.server never sends it, so every upload waited the full
  second: a tiny training run on gs:// took 165 s instead of about 30 s.
  """

  class Continuing(handler_class):

    def parse_request(self):
      if not super().parse_request():
        return False
      if self.headers.get("Expect", "").lower() == "100-continue":
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
      return True

  return Continuing


def serve(ready_file: str, bucket: str, cert: str, key: str) -> None:
  """Serves the emulator (in memory) and the TLS proxy until the process is killed."""
  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server as server_module
  from gcp_storage_emulator.handlers import buckets
  from gcp_storage_emulator.handlers import objects
  from gcp_storage_emulator.server import RequestHandler
  from gcp_storage_emulator.storage import Storage
  _fix_emulator(server_module, objects)
  # In memory, the metadata the emulator re-serialises whole after every write (its
  # .meta file, read only at start) is never read again: skipping it keeps each
  # request's cost flat instead of growing with the objects the session wrote.
  Storage._write_config_to_file = lambda self: None  # pylint: disable=protected-access
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  httpd = _EmulatorHTTPServer(("127.0.0.1", 0),
                              functools.partial(_continuing(RequestHandler), storage))
  proxy = _ProxyServer(httpd.server_address[1], cert, key)
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  ports = {"http_port": httpd.server_address[1], "proxy_port": proxy.server_address[1]}
  with open(ready_file + ".tmp", "w") as f:
    json.dump(ports, f)
  os.replace(ready_file + ".tmp", ready_file)
  httpd.serve_forever()


def make_certificate(directory: str) -> tuple[str, str]:
  """A self-signed certificate (its own CA) for GOOGLE_STORAGE_HOSTS: (cert, key)."""
  openssl = shutil.which("openssl")
  if openssl is None:
    raise RuntimeError("the gs:// tests need the openssl command (apt-get install "
                       "openssl) to make the emulator proxy's TLS certificate")
  cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
  names = ",".join(f"DNS:{h}" for h in GOOGLE_STORAGE_HOSTS)
  subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                  "-keyout", key, "-out", cert, "-subj", f"/CN={GOOGLE_STORAGE_HOSTS[0]}",
                  "-addext", f"subjectAltName={names}",
                  "-addext", "basicConstraints=critical,CA:TRUE"],
                 check=True, capture_output=True)
  return cert, key


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_environment(http_port: int, proxy_port: int, cert: str) -> dict[str, str]:
  """The variables that point TensorStore, tf.io.gfile and Google clients at it."""
  http_url = f"http://127.0.0.1:{http_port}"
  return {
      "TENSORSTORE_GCS_HTTP_URL": http_url,
      "GCE_METADATA_ROOT": f"127.0.0.1:{_closed_port()}",
      "GCE_METADATA_HOST": f"127.0.0.1:{_closed_port()}",
      "STORAGE_EMULATOR_HOST": http_url,
      "https_proxy": f"http://127.0.0.1:{proxy_port}",
      "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
      "no_proxy": "127.0.0.1,localhost",
      "NO_PROXY": "127.0.0.1,localhost",
      "CURL_CA_BUNDLE": cert,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true", "all_proxy": f"http://127.0.0.1:{proxy_port}",
      # Our own writes and reads must be seen at once (TF caches stats for 5 s).
      "GCS_STAT_CACHE_MAX_AGE": "0",
      "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
      "GCS_READ_CACHE_MAX_SIZE_MB": "0",
  }


def list_objects(environment: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
  """The names of the objects in `bucket` under `prefix`, asked of the emulator
  directly over its JSON API (not through the clients under test)."""
  # pylint: disable=g-import-not-at-top
  import urllib.parse
  import urllib.request
  query = urllib.parse.urlencode({"prefix": prefix})
  url = f"{environment['STORAGE_EMULATOR_HOST']}/storage/v1/b/{bucket}/o?{query}"
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  with opener.open(url, timeout=30) as response:
    listing = json.load(response)
  return sorted(item["name"] for item in listing.get("items", []))


@contextlib.contextmanager
def running_emulator(bucket: str = "bucket", timeout_s: float = 60
                     ) -> Iterator[dict[str, str]]:
  """Starts the emulator with `bucket`; yields the client environment (not yet set)."""
  directory = tempfile.mkdtemp(prefix="psch-jax-gcs-emulator-")
  try:
    cert, key = make_certificate(directory)
    ready = os.path.join(directory, "ports.json")
    log = open(os.path.join(directory, "emulator.log"), "wb")
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--ready-file", ready,
         "--bucket", bucket, "--cert", cert, "--key", key],
        stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + timeout_s
      while not os.path.exists(ready):
        if process.poll() is not None or time.monotonic() > deadline:
          log.flush()
          with open(log.name) as f:
            raise RuntimeError(f"the GCS emulator did not start:\n{f.read()}")
        time.sleep(0.05)
      with open(ready) as f:
        ports = json.load(f)
      yield client_environment(ports["http_port"], ports["proxy_port"], cert)
    finally:
      if os.environ.get("GCS_EMULATOR_DEBUG"):  # Shows each request the emulator saw.
        with open(log.name) as f:
          print(f.read())
      process.kill()
      process.wait()
      log.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def define_flags() -> None:
  """The flags of the script (the module docstring)."""
  flags.DEFINE_string("ready-file", None, "written once the server listens")
  flags.DEFINE_string("bucket", None, "the one bucket served")
  flags.DEFINE_string("cert", None, "TLS certificate file")
  flags.DEFINE_string("key", None, "TLS key file")
  flags.mark_flags_as_required(["ready-file", "bucket", "cert", "key"])


def main(argv: list[str]) -> None:
  del argv
  flag_values = flags.FLAGS
  serve(flag_values["ready-file"].value, flag_values.bucket, flag_values.cert,
        flag_values.key)


if __name__ == "__main__":
  define_flags()
  app.run(main)
