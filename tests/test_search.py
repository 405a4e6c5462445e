"""Tests for psch_jax.search on a run trained once with configs/fashion_mnist.py:tiny.

What a user relies on: a database image, saved as a file and searched, comes back as
its own database row at Hamming distance 0; every reported distance is the distance
to the code the evaluation saved; the ranking is the evaluation's; bad input is a
UserError (exit code 2 from the command line). The same trained run also checks that
its results.json agrees with the independent NumPy recomputation of psch_jax.reports
and that reports can be drawn from the work directory alone.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from psch_jax import config as psch_config
from psch_jax import io_utils
from psch_jax import reports
from psch_jax import search
from psch_jax.errors import UserError
from tests.helpers import ROOT, needs_fashion_mnist

pytestmark = needs_fashion_mnist

DATABASE_ROWS = (0, 57, 199)


@pytest.fixture(scope="module")
def workdir(tiny_run):
  """The shared trained run (conftest.py); search and reports only read it."""
  return tiny_run


@pytest.fixture(scope="module")
def index(workdir):
  return search.load_index(workdir)


@pytest.fixture(scope="module")
def database_images(workdir, index, tmp_path_factory):
  """PNG files of some database images, as a user would save them."""
  directory = tmp_path_factory.mktemp("images")
  source = reports.load_run_source(workdir)
  paths = []
  for row in DATABASE_ROWS:
    image = source.read(index.database_indices[[row]])[0]
    path = str(directory / f"row{row}.png")
    Image.fromarray(image[..., 0]).save(path)  # grey: (H, W)
    paths.append(path)
  return paths


def test_database_image_finds_itself_at_distance_zero(index, database_images):
  num_database = len(index.database_indices)
  matches = search.search_index(index, database_images, topk=num_database)
  for row, image_matches in zip(DATABASE_ROWS, matches):
    assert len(image_matches) == num_database
    own = [m for m in image_matches if m["database_row"] == row]
    assert own and own[0]["distance"] == 0
    assert own[0]["index"] == index.database_indices[row]


def test_distances_and_order_match_the_saved_database_codes(workdir, index,
                                                            database_images):
  codes = search.encode_files(index, database_images)
  saved = reports.unpack_codes(np.load(os.path.join(workdir, "codes", "database.npy")),
                               index.config.model.num_bits)
  labels = reports.load_run_source(workdir).labels
  matches = search.search_index(index, database_images, topk=25)
  for code, image_matches in zip(codes, matches):
    expected = np.sum(saved != code[None, :], axis=1)  # Hamming to every saved code
    rows = [m["database_row"] for m in image_matches]
    # The evaluation's ranking: distance, then database row (= index order).
    np.testing.assert_array_equal(rows, np.argsort(expected, kind="stable")[:25])
    for m in image_matches:
      assert m["distance"] == expected[m["database_row"]]
      assert m["index"] == index.database_indices[m["database_row"]]
      assert m["labels"] == np.flatnonzero(labels[m["index"]]).tolist()
    assert [m["rank"] for m in image_matches] == list(range(1, 26))


def test_search_from_workdir_accepts_colour_images_of_any_size(workdir, database_images,
                                                               tmp_path):
  path = str(tmp_path / "big.jpg")
  with Image.open(database_images[0]) as image:
    image.convert("RGB").resize((64, 50)).save(path)
  matches = search.search(workdir, [path, database_images[1]], topk=3)
  assert [len(m) for m in matches] == [3, 3]
  assert matches[1][0]["distance"] == 0


def test_bad_images_and_topk_are_user_errors(index, database_images, tmp_path):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
  with pytest.raises(UserError, match="cannot decode"):
    search.search_index(index, [database_images[0], str(broken)], topk=5)
  with pytest.raises(UserError, match="does not exist"):
    search.search_index(index, [str(tmp_path / "missing.png")], topk=5)
  with pytest.raises(UserError, match="topk"):
    search.search_index(index, database_images, topk=0)
  with pytest.raises(UserError, match="no images"):
    search.search_index(index, [], topk=5)


def test_workdir_without_checkpoint_codes_or_config_is_a_user_error(workdir, tmp_path):
  with pytest.raises(UserError, match="config.json is missing"):
    search.load_index(str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    search.load_index(str(tmp_path / "nowhere"))
  partial = tmp_path / "partial"
  shutil.copytree(workdir, partial, ignore=shutil.ignore_patterns("checkpoints"))
  with pytest.raises(UserError, match="checkpoints is missing"):
    search.load_index(str(partial))
  os.makedirs(partial / "checkpoints")
  with pytest.raises(UserError, match="checkpoints is missing or empty, and they were "
                                      "made from checkpoint"):
    search.load_index(str(partial))
  shutil.rmtree(partial)
  shutil.copytree(workdir, partial, symlinks=True)
  os.remove(partial / "codes" / "database.npy")
  with pytest.raises(UserError, match="database.npy is missing or not the file the "
                                      "evaluation wrote"):
    search.load_index(str(partial))


def run_search(*flags):
  return subprocess.run([sys.executable, "-m", "psch_jax.commands.search", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line(workdir, database_images, tmp_path):
  result = run_search(f"--workdir={workdir}",
                      f"--images={database_images[2]},{tmp_path / 'missing.png'}",
                      "--topk=4")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "does not exist" in result.stderr and "Traceback" not in result.stderr
  result = run_search(f"--workdir={workdir}", f"--images={database_images[2]}",
                      "--topk=4")
  assert result.returncode == 0, result.stderr[-2000:]
  assert database_images[2] in result.stdout and "distance" in result.stdout
  result = run_search(f"--workdir={workdir}", f"--images={database_images[0]}",
                      "--topk=0")
  assert result.returncode == 2 and "topk" in result.stderr


def test_trained_run_results_agree_with_independent_recomputation(workdir):
  assert reports.print_comparison(workdir) == 0
  source = reports.load_run_source(workdir)
  names = {c.name for c in reports.verify_results(workdir, source)}
  assert {"map@10", "map@all", "map@all_tie_aware", "precision@radius2"} <= names


def test_reports_from_a_trained_workdir(workdir, tmp_path):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  source = reports.load_run_source(workdir)
  split = {name: np.load(os.path.join(workdir, "splits", f"{name}.npy"))
           for name in ("query", "database")}
  codes = {name: reports.unpack_codes(
      np.load(os.path.join(workdir, "codes", f"{name}.npy")), results["num_bits"])
           for name in split}
  paths = reports.write_reports(
      str(tmp_path), results=results, codes=codes, query_indices=split["query"],
      database_indices=split["database"], query_labels=source.labels[split["query"]],
      database_labels=source.labels[split["database"]], source=source)
  for path in paths:
    if path.endswith(".png"):
      with Image.open(path) as image:
        image.verify()
  assert f"| map@all | {results['map@all']:.4f} |" in (tmp_path / "results.md").read_text()


def test_a_run_config_saved_before_the_method_section_existed_is_psch(tmp_path):
  """PSCH wrote config.json without `method` before the deep peers came: search
  rebuilds it as the PSCH run it is."""
  saved = psch_config.base_config().to_dict()
  del saved["method"]
  io_utils.write_json(str(tmp_path / "config.json"), saved)
  config = search.read_run_config(str(tmp_path))
  assert config.method.name == "psch"
  assert config.method.to_dict() == psch_config.base_config().method.to_dict()
