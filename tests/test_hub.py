"""Tests of the ImageNet VGG-16 download (`model.pretrained = "imagenet"`).

A local HTTP server on 127.0.0.1 stands in for the Hugging Face Hub: it answers
`/{repo}/resolve/{revision}/{filename}` (HEAD and GET) with the headers
`huggingface_hub.hf_hub_download` reads (`X-Repo-Commit`, `ETag`, `Content-Length`)
and serves a generated weight file in timm's `vgg16.tv_in1k` layout (fc6 / fc7 as
convolutions). The real file cannot be fetched here (no network); its revision and
sha256 are pinned in `pretrained.IMAGENET_VGG16`, and the tests pin the generated
file's own sha256 the same way.
"""
import http.server
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import safetensors.numpy

from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax import io_utils
from psch_jax import pretrained
from psch_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ID = "timm/vgg16.tv_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as pinned


def _timm_vgg16_shapes() -> dict[str, tuple[int, ...]]:
  """timm's vgg16 state-dict shapes, written out here from timm's `VGG` class
  (features as torchvision's; `ConvMlp` fc1 7x7 and fc2 1x1 convs; `head.fc`)."""
  shapes, in_channels, index = {}, 3, 0
  for entry in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M"]:
    if entry == "M":
      index += 1
      continue
    shapes[f"features.{index}.weight"] = (entry, in_channels, 3, 3)
    shapes[f"features.{index}.bias"] = (entry,)
    in_channels, index = entry, index + 2
  shapes.update({"pre_logits.fc1.weight": (4096, 512, 7, 7),
                 "pre_logits.fc1.bias": (4096,),
                 "pre_logits.fc2.weight": (4096, 4096, 1, 1),
                 "pre_logits.fc2.bias": (4096,),
                 "head.fc.weight": (1000, 4096), "head.fc.bias": (1000,)})
  return shapes


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
  """(state, path, sha256) of a random timm-layout VGG-16 file (553 MB)."""
  rng = np.random.default_rng(0)
  state = {key: rng.random(shape, dtype=np.float32)
           for key, shape in _timm_vgg16_shapes().items()}
  path = str(tmp_path_factory.mktemp("hub_files") / "model.safetensors")
  safetensors.numpy.save_file(state, path)
  return state, path, io_utils.file_digest(path)


class FakeHub:
  """A Hub stand-in on 127.0.0.1 serving `{(repo_id, revision, filename): path}`.

  Answers like huggingface.co for a file stored in the repository itself (no CDN
  redirect): `ETag` is the sha256, `X-Repo-Commit` the commit, `Content-Length` the
  size; a file it does not hold gets 404 with `X-Error-Code: EntryNotFound`.
  `requests` lists every (method, path) it was asked.
  """

  def __init__(self, files: dict[tuple[str, str, str], str]):
    self.files = files
    self.requests: list[tuple[str, str]] = []
    # The ETag of each file, hashed once: a 553 MB file takes a second per hash, and
    # every HEAD and GET answers with it.
    self.etags = {key: io_utils.file_digest(path) for key, path in files.items()}
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # Keep pytest's output clean.
        pass

      def _answer(self, with_body: bool):
        hub.requests.append((self.command, self.path))
        parts = self.path.split("?")[0].lstrip("/").split("/")
        # /{owner}/{name}/resolve/{revision}/{filename}
        key = None
        if len(parts) >= 5 and parts[2] == "resolve":
          key = ("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if key not in hub.files:
          self.send_response(404)
          self.send_header("X-Error-Code", "EntryNotFound")
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        path = hub.files[key]
        self.send_response(200)
        self.send_header("ETag", f'"{hub.etags[key]}"')
        self.send_header("X-Repo-Commit", key[1])
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if with_body:
          with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
              self.wfile.write(chunk)

      def do_HEAD(self):  # pylint: disable=invalid-name
        self._answer(with_body=False)

      def do_GET(self):  # pylint: disable=invalid-name
        self._answer(with_body=True)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def hub(timm_file):
  server = FakeHub({(REPO_ID, REVISION, "model.safetensors"): timm_file[1]})
  yield server
  server.stop()


def _hub_file(sha256: str) -> pretrained.HubFile:
  return pretrained.HubFile(repo_id=REPO_ID, filename="model.safetensors",
                            revision=REVISION, sha256=sha256)


@pytest.mark.slow
def test_download_verifies_and_loads_once_then_works_offline(timm_file, hub, tmp_path):
  state, _, sha256 = timm_file
  cache = str(tmp_path / "hf_cache")
  params = pretrained.resolve_vgg16_weights(
      "imagenet", None, cache_dir=cache, endpoint=hub.url, hub_file=_hub_file(sha256))
  assert [method for method, _ in hub.requests] == ["HEAD", "GET"]
  assert hub.requests[1][1] == f"/{REPO_ID}/resolve/{REVISION}/model.safetensors"
  cached = pretrained.hub_cache_path(_hub_file(sha256), cache)
  assert os.path.isfile(cached) and io_utils.file_digest(cached) == sha256

  # Keys mapped onto our layers: features.N -> convs, timm's fc1/fc2 convs -> fc6/fc7.
  np.testing.assert_array_equal(params["conv1_1"]["kernel"],
                                state["features.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["conv3_3"]["bias"], state["features.14.bias"])
  np.testing.assert_array_equal(params["conv5_3"]["kernel"],
                                state["features.28.weight"].transpose(2, 3, 1, 0))
  fc1 = state["pre_logits.fc1.weight"]
  assert params["fc6"]["kernel"].shape == (25088, 4096)
  # Our fc6 reads the pooled (7, 7, 512) map flattened in torch's (C, H, W) order:
  # row c * 49 + h * 7 + w must hold timm's fc1 kernel entry [o, c, h, w].
  for o, c, h, w in [(0, 0, 0, 0), (4095, 511, 6, 6), (17, 300, 2, 5), (4000, 3, 6, 0)]:
    assert params["fc6"]["kernel"][c * 49 + h * 7 + w, o] == fc1[o, c, h, w]
  np.testing.assert_array_equal(params["fc6"]["bias"], state["pre_logits.fc1.bias"])
  np.testing.assert_array_equal(params["fc7"]["kernel"],
                                state["pre_logits.fc2.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(params["fc7"]["bias"], state["pre_logits.fc2.bias"])
  assert "head" not in params and len(params) == 15

  # Once downloaded, the pinned commit is found in the cache without asking the hub,
  # so a machine that lost its network still loads (and re-checks the sha256).
  hub.stop()
  again = pretrained.resolve_vgg16_weights(
      "imagenet", None, cache_dir=cache, endpoint=hub.url, hub_file=_hub_file(sha256))
  assert len(hub.requests) == 2
  np.testing.assert_array_equal(again["fc7"]["kernel"], params["fc7"]["kernel"])


@pytest.mark.slow
def test_wrong_sha256_is_refused_with_the_path_and_both_hashes(timm_file, hub, tmp_path):
  _, _, sha256 = timm_file
  pinned = "0" * 64
  cache = str(tmp_path / "hf_cache")
  with pytest.raises(UserError) as error:
    pretrained.resolve_vgg16_weights("imagenet", None, cache_dir=cache,
                                     endpoint=hub.url, hub_file=_hub_file(pinned))
  message = str(error.value)
  cached = pretrained.hub_cache_path(_hub_file(pinned), cache)
  assert f"{cached} has sha256 {sha256}, not the pinned {pinned}" in message
  # The cache entry is a link to a blob; both go, or the next run re-links the blob.
  assert f"Delete it and the bytes it links to ({os.path.realpath(cached)})" in message
  assert os.path.realpath(cached) != cached and "pretrained_path" in message


def test_a_local_timm_file_is_loaded_without_the_hub(timm_file):
  state, path, _ = timm_file
  params = pretrained.resolve_vgg16_weights("none", path)  # the path wins
  fc1 = state["pre_logits.fc1.weight"]
  for o in (0, 2049, 4095):  # Whole columns: fc6's input rows in (C, H, W) order.
    np.testing.assert_array_equal(params["fc6"]["kernel"][:, o], fc1[o].reshape(-1))


@pytest.mark.slow
def test_unreachable_hub_names_the_url_the_cache_path_and_pretrained_path(
    tmp_path, monkeypatch):
  # huggingface_hub retries a refused connection with back-off (about 23 s of sleeps,
  # which a user without network waits before this error); the test skips the waits,
  # not the retries.
  monkeypatch.setattr(time, "sleep", lambda seconds: None)
  # A port nobody listens on: connection refused, as on a machine without network.
  stopped = FakeHub({})
  stopped.stop()
  cache = str(tmp_path / "hf_cache")
  hub_file = _hub_file("1" * 64)
  with pytest.raises(UserError) as error:
    pretrained.resolve_vgg16_weights("imagenet", None, cache_dir=cache,
                                     endpoint=stopped.url, hub_file=hub_file)
  message = str(error.value)
  assert "no network access to the Hub and no cached copy" in message
  assert "ConnectError" in message  # the cause, not only the library's summary
  assert (f"download {stopped.url}/{REPO_ID}/resolve/{REVISION}/model.safetensors "
          f"(sha256 {'1' * 64})") in message
  assert f"copy it to {pretrained.hub_cache_path(hub_file, cache)}" in message
  assert "--config.model.pretrained_path=" in message
  assert "--config.model.pretrained=none" in message


def test_pretrained_must_be_said_for_vgg16():
  assert pretrained.resolve_vgg16_weights("none", None) is None
  with pytest.raises(UserError, match="'imagenet'.*'none'.*pretrained_path"):
    pretrained.resolve_vgg16_weights(None, None)


@pytest.mark.parametrize("backbone,field,value,message", [
    ("vgg16", "pretrained", None, "backbone='vgg16' needs its starting weights said"),
    ("vgg16", "pretrained", "torchvision", r"model.pretrained='torchvision' is not one "
                                           r"of \['imagenet', 'none'\]"),
    ("small_cnn", "pretrained", "imagenet", "ImageNet weights exist for 'vgg16' only"),
])
def test_config_check_of_model_pretrained(backbone, field, value, message):
  config = psch_config.base_config()
  config.model.backbone = backbone
  config.model[field] = value
  with pytest.raises(UserError, match=message):
    config_schema.check_config(config, num_devices=8)
  config.model.pretrained_path = "vgg16.safetensors"  # a file said is enough for VGG-16
  if value is None:
    config_schema.check_config(config, num_devices=8)


def test_main_without_network_exits_2_and_writes_nothing(tmp_path):
  """The acceptance command on a machine without network access."""
  workdir = tmp_path / "work"
  workdir.mkdir()
  cache = tmp_path / "hf_cache"
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
         "HF_ENDPOINT": "http://127.0.0.1:9"}  # and nothing would answer anyway
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/cifar10.py", f"--workdir={workdir}",
       f"--config.data.data_dir={tmp_path / 'no_tfds'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 2, output
  assert "Traceback" not in output
  expected_path = os.path.join(
      str(cache), "models--timm--vgg16.tv_in1k", "snapshots",
      pretrained.IMAGENET_VGG16.revision, "model.safetensors")
  assert (f"download http://127.0.0.1:9/timm/vgg16.tv_in1k/resolve/"
          f"{pretrained.IMAGENET_VGG16.revision}/model.safetensors") in output
  assert f"copy it to {expected_path}" in output
  assert "--config.model.pretrained_path=" in output
  assert os.listdir(workdir) == []
  assert not (tmp_path / "no_tfds").exists()
