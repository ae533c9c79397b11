"""Cloud URIs (gs://, s3://) for the workdir, checkpoints, metrics, eval.json, data and tokenizer.

No test touches the network. ``fake_gcs`` registers, for fsspec's ``gs`` / ``gcs``
protocols (the ones etils.epath's fsspec backend asks for when TensorFlow is absent), a
filesystem rooted in a temporary folder: ``gs://bucket/x`` is ``<root>/bucket/x``. Orbax
also reaches GCS outside epath, in two places, both redirected for the checkpoint tests:
TensorStore's own ``gcs`` kvstore driver for the arrays (pointed at its ``file`` driver in
the same root) and google-cloud-storage's bucket lookup before listing steps (answered
"no hierarchical namespace"). Everything else, Orbax's own files and ours, goes through
the fake ``gs://`` filesystem. ``no_network`` fails any Python socket connection beyond
loopback, and TensorStore's GCS endpoint and the metadata server point at a closed local port.
"""

import importlib
import json
import os
import pickle
import socket

import ml_collections
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import metrics as metrics_lib
from parcel_jax import paths
from parcel_jax.data import gemma_tokenizer, images, pipeline
from tests import paligemma_fixtures as fx

_fsspec_registry = importlib.import_module("fsspec.registry")
_CLOSED_PORT = "http://127.0.0.1:9"


def _clear_epath_cache():
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one filesystem per protocol


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  real_connect = socket.socket.connect

  def connect(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
      raise RuntimeError(f"test tried to reach the network: {address}")
    return real_connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", connect)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", _CLOSED_PORT)
  monkeypatch.setenv("GCE_METADATA_ROOT", "127.0.0.1:9")
  monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
  monkeypatch.setenv("NO_GCE_CHECK", "True")


@pytest.fixture
def isolated_fsspec(monkeypatch):
  """fsspec's registry and epath's filesystem cache restored after the test; epath always on
  its fsspec backend (never tf.io.gfile, even with TensorFlow installed)."""
  from etils.epath import gpath
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  saved = dict(_fsspec_registry._registry), dict(_fsspec_registry.known_implementations)
  _clear_epath_cache()
  yield
  for live, copy in zip((_fsspec_registry._registry, _fsspec_registry.known_implementations), saved):
    live.clear()
    live.update(copy)
  _clear_epath_cache()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch, isolated_fsspec):
  """``gs://bucket/...`` is ``<root>/bucket/...``. Returns the root (a pathlib.Path). The test
  runs in an empty cwd, so that a local folder named ``gs:`` would be seen."""
  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      kwargs.pop("finalize_on_close", None)  # what epath passes to gcsfs
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True), **kwargs)

  for protocol in ("gs", "gcs"):
    _fsspec_registry._registry[protocol] = FakeGCS
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  assert not any(name.startswith("gs") for name in os.listdir(cwd)), os.listdir(cwd)


@pytest.fixture
def orbax_on_fake_gcs(fake_gcs, monkeypatch):
  """Orbax's two GCS touches outside epath, redirected into ``fake_gcs``'s root. Returns the
  list of gs:// directories TensorStore was asked for."""
  from orbax.checkpoint._src.path import gcs_utils
  asked = []

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    asked.append(path)
    return {"driver": "file", "path": os.path.join(str(fake_gcs), bucket, key)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(ckpt_lib, "_ORBAX_SCHEME_MODULES", {})  # google-cloud-storage: not used now
  return asked


@pytest.fixture
def no_os_calls_on_uris(monkeypatch):
  """Fails if a local filesystem call (os.*, open) gets a gs:// path: URIs must go through epath."""
  import builtins
  bad = []

  def spy(module, name):
    real = getattr(module, name)

    def wrapper(p, *a, **k):
      if isinstance(p, (str, os.PathLike)) and os.fspath(p).startswith("gs:"):
        bad.append((name, os.fspath(p)))
      return real(p, *a, **k)

    monkeypatch.setattr(module, name, wrapper)

  for name in ("listdir", "makedirs", "mkdir", "scandir", "stat"):
    spy(os, name)
  for name in ("isdir", "exists", "isfile", "abspath"):
    spy(os.path, name)
  spy(builtins, "open")
  yield bad
  assert not bad, bad


# --------------------------------------------------------------------- the helper

def test_uri_or_local_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.scheme("gs://b/x") == "gs" and paths.scheme("S3://b/x") == "s3"
  assert paths.is_uri("gs://b/x") and paths.is_uri("s3://b") and not paths.is_uri("/x/gs://y")
  assert not paths.is_uri("run") and not paths.is_uri("file:///tmp/x") and not paths.is_uri("gs:run")
  assert paths.normalize("run") == str(tmp_path / "run")        # local: os.path.abspath, as before
  assert paths.normalize("file:///tmp/x") == "/tmp/x"
  assert paths.normalize("gs://b/run") == "gs://b/run"
  assert str(paths.to_epath("gs://b/run")) == "gs://b/run"
  assert paths.join("gs://b/run", "checkpoints", "1") == "gs://b/run/checkpoints/1"
  assert paths.join("gs://b/data", "gs://c/img.png") == "gs://c/img.png"
  assert paths.join("/data", "img.png") == "/data/img.png" and paths.join("/data", "/abs.png") == "/abs.png"
  assert paths.dirname("gs://b/data/train.json") == "gs://b/data" and paths.dirname("gs://b/x") == "gs://b"
  assert paths.basename("gs://b/run/") == "run" and paths.basename("/x/run/") == "run"
  assert set(paths.supported_schemes()) >= {"gs", "s3"}
  with pytest.raises(ValueError, match=r"--workdir=hdfs://nn/run: the scheme hdfs:// is not supported"):
    paths.makedirs("hdfs://nn/run", flag="--workdir")
  assert os.listdir(tmp_path) == []  # no local folder named 'hdfs:'


# ----------------------------------------------------- missing filesystem packages

def _without_implementation(protocols, package):
  """fsspec knows ``protocols`` only by a class in a module that does not exist (as when
  ``package`` is not installed)."""
  for p in protocols:
    _fsspec_registry._registry.pop(p, None)
    _fsspec_registry.known_implementations[p] = {
        "class": f"parcel_test_not_installed_{package}.FileSystem", "err": f"Install {package} to access {p}://"}
  _clear_epath_cache()


@pytest.mark.parametrize("scheme,package,protocols", [("gs", "gcsfs", ("gs", "gcs")), ("s3", "s3fs", ("s3", "s3a"))])
def test_missing_package_names_flag_scheme_and_package(scheme, package, protocols, isolated_fsspec,
                                                       tmp_path, monkeypatch):
  _without_implementation(protocols, package)
  monkeypatch.chdir(tmp_path)
  uri = f"{scheme}://bucket/run"
  with pytest.raises(ValueError) as e:
    paths.makedirs(uri, flag="--workdir")
  msg = str(e.value)
  assert msg.startswith(f"--workdir={uri}: ") and f"{scheme}://" in msg and f"pip install {package}" in msg, msg
  with pytest.raises(ValueError, match=rf"data.train_path={scheme}://bucket/train.json: .*pip install {package}"):
    pipeline.build_source(ml_collections.ConfigDict(dict(
        name="llava", image_size=16, max_text_len=24, train_path=f"{scheme}://bucket/train.json",
        tokenizer="unused", on_error="raise", max_skip_fraction=1.0, long_text="reject")), "train")
  with pytest.raises(ValueError, match=rf"data.tokenizer={scheme}://bucket/tok: .*pip install {package}"):
    pipeline.build_tokenizer(ml_collections.ConfigDict(dict(name="jsonl", tokenizer=f"{scheme}://bucket/tok")))
  assert os.listdir(tmp_path) == []


def test_train_with_a_gs_workdir_and_no_gcsfs_fails_first(isolated_fsspec, tmp_path, monkeypatch):
  """The workdir's first touch, before the model is built: a ValueError naming --workdir."""
  from parcel_jax import train
  from tests.util import tiny_config
  _without_implementation(("gs", "gcs"), "gcsfs")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run: cannot reach gs:// paths, .*gcsfs"):
    train.train_and_evaluate(tiny_config(), "gs://bucket/run")
  assert os.listdir(tmp_path) == []  # no local folder 'gs:'


def test_checkpoint_schemes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"--workdir=s3://b/run/checkpoints: Orbax .* only to local paths and gs://"):
    ckpt_lib.Checkpointer("s3://b/run/checkpoints", flag="--workdir")
  if ckpt_lib._module_missing("google.cloud.storage"):
    with pytest.raises(ValueError, match=r"gs://b/run/checkpoints: Orbax checkpoints on gs:// need .*"
                                         r"pip install google-cloud-storage"):
      ckpt_lib.Checkpointer("gs://b/run/checkpoints", flag="--workdir")
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ metrics and eval.json

def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_metric_writer_on_a_uri(fake_gcs, no_os_calls_on_uris):
  run = fake_gcs / "bucket" / "run"
  w = metrics_lib.MetricWriter("gs://bucket/run", sync_every_sec=3600)
  w.write(1, {"step": 1, "loss": 2.5})
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1]   # the first record: copied at once
  w.write(2, {"step": 2, "loss": 2.0})
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1]   # then at most every sync_every_sec
  w.close()
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2]
  events = list((run / "tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents") and events[0].stat().st_size > 0
  # A resumed run appends to the history; sync_every_sec=0 copies every record.
  w = metrics_lib.MetricWriter("gs://bucket/run", sync_every_sec=0)
  w.write(3, {"step": 3, "loss": 1.5})
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2, 3]
  w.close()
  assert sorted(_scalar_steps(run / "tensorboard", "loss")) == [1, 2, 3]  # two events files


def _scalar_steps(folder, tag):
  """Steps of scalar ``tag`` in a folder's TensorBoard event files (TFRecord framing)."""
  import struct
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  for f in sorted(folder.iterdir()):
    data, pos = f.read_bytes(), 0
    while pos < len(data):
      (n,) = struct.unpack("Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      steps += [event.step for v in event.summary.value if v.tag == tag]
  return steps


def test_write_text_on_a_uri(fake_gcs, no_os_calls_on_uris):
  paths.makedirs("gs://bucket/run", flag="--workdir")
  paths.write_text(paths.join("gs://bucket/run", "eval.json"), json.dumps({"overall": 0.5}, indent=2))
  assert json.loads((fake_gcs / "bucket" / "run" / "eval.json").read_text()) == {"overall": 0.5}
  assert json.loads(paths.read_text("gs://bucket/run/eval.json")) == {"overall": 0.5}


# ------------------------------------------------------------------ data on a URI

@pytest.fixture
def cloud_data(fake_gcs, tmp_path):
  """LLaVA json, jsonl, images and a tokenizer under gs://bucket/data (and imgs/)."""
  data = fake_gcs / "bucket" / "data"
  fx.write_image(str(data / "images" / "a.png"), "rgb")
  fx.write_image(str(data / "images" / "b.jpg"), "jpeg", size=(50, 20))
  fx.write_image(str(fake_gcs / "bucket" / "imgs" / "c.png"), "gray")
  turns = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
  (data / "train.json").write_text(json.dumps([
      {"image": "images/a.png", "conversations": turns("what colour is the cat", "red")},
      {"image": "images/b.jpg", "conversations": turns("how many", "two")},
      {"image": "images/missing.png", "conversations": turns("q", "a")}]))
  (data / "train.jsonl").write_text(
      json.dumps({"image": "c.png", "prefix": "describe", "suffix": "a square"}) + "\n\n"
      + json.dumps({"image": "gs://bucket/data/images/a.png", "prefix": "caption en", "suffix": "a cat"}) + "\n")
  fx.train_sentencepiece(str(data / "tok" / "tokenizer.model"))
  return data


def _cfg(name, path, **kw):
  return ml_collections.ConfigDict({**dict(
      name=name, image_size=16, max_text_len=24, train_path=path, eval_path=path,
      tokenizer="gs://bucket/data/tok", on_error="raise", max_skip_fraction=1.0, long_text="reject",
      train_size=1, eval_size=1, families=()), **kw})


def test_llava_jsonl_images_and_tokenizer_on_uris(cloud_data, no_os_calls_on_uris):
  source = pipeline.build_source(_cfg("llava", "gs://bucket/data/train.json"), "train")
  assert len(source) == 3 and source.path == "gs://bucket/data/train.json"
  assert source.raw.image_root == "gs://bucket/data"
  ex = source[1]
  assert (ex["question"], ex["answer"]) == ("how many", "two") and ex["image"].shape == (16, 16, 3)
  with pytest.raises(images.BadExample) as e:
    source[2]
  assert e.value.kind == "missing_image" and "gs://bucket/data/images/missing.png" in e.value.message

  source = pipeline.build_source(_cfg("jsonl", "gs://bucket/data/train.jsonl", image_root="gs://bucket/imgs"), "train")
  assert len(source) == 2 and source.describe(1) == "example 1 (line 3)"
  assert source[0]["answer"] == "a square" and source[0]["image"].shape == (16, 16, 3)
  assert source[1]["answer"] == "a cat"  # an image given as a full URI

  local = images.decode_image(str(cloud_data / "images" / "a.png"), 16)
  np.testing.assert_array_equal(images.decode_image("gs://bucket/data/images/a.png", 16), local)

  tok = pipeline.build_tokenizer(_cfg("llava", "gs://bucket/data/train.json"))
  assert tok.path == "gs://bucket/data/tok/tokenizer.model"
  reference = gemma_tokenizer.GemmaTokenizer(str(cloud_data / "tok"))
  assert tok.encode("the cat is left of the dog") == reference.encode("the cat is left of the dog")
  assert pickle.loads(pickle.dumps(tok)).encode("two red squares") == reference.encode("two red squares")
  assert len(tok.loc_ids) == 1024

  # The whole input pipeline (Grain, in-process threads) on the URI.
  batch = next(iter(pipeline.build_train_dataset(_cfg("llava", "gs://bucket/data/train.json", on_error="skip"),
                                                 seed=0, global_batch_size=2, num_threads=0)))
  assert batch["image"].shape == (2, 16, 16, 3) and batch["loss_mask"].any(1).all()


# ------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_on_gs(orbax_on_fake_gcs, fake_gcs, no_os_calls_on_uris, caplog):
  import grain
  import jax.numpy as jnp
  from parcel_jax import runs
  from tests.util import tiny_config

  config = tiny_config()
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": 2}
  ds = grain.MapDataset.range(100).to_iter_dataset()
  it = iter(ds)
  next(it), next(it)
  ckpt = ckpt_lib.Checkpointer("gs://bucket/run/checkpoints", flag="--workdir")
  assert ckpt.directory == "gs://bucket/run/checkpoints" and str(ckpt.path) == "gs://bucket/run/checkpoints"
  assert str(ckpt.manager.directory) == "gs://bucket/run/checkpoints"
  for step in (1, 2, 3):
    ckpt.save(step, {**state, "step": step}, it, config)
  ckpt.close()
  steps = fake_gcs / "bucket" / "run" / "checkpoints"
  assert sorted(p.name for p in steps.iterdir()) == ["2", "3"]            # keep=2
  assert (steps / "3" / "commit_success.txt").exists()                     # gs://: committed in place
  assert orbax_on_fake_gcs and all(p.startswith("gs://bucket/run/checkpoints/") for p in orbax_on_fake_gcs)

  (steps / "4").mkdir()  # an interrupted gs:// save: a step folder without commit_success.txt
  (steps / "4" / "junk").write_text("half written")
  with caplog.at_level("WARNING"):
    ckpt = ckpt_lib.Checkpointer("gs://bucket/run/checkpoints")
  assert any("incomplete checkpoint gs://bucket/run/checkpoints/4" in r.getMessage() for r in caplog.records)
  assert ckpt.latest_step() == 3
  fresh = iter(ds)
  restored = ckpt.restore(3, {"params": {"w": jnp.zeros((2, 3))}, "step": 0}, fresh)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert int(restored["step"]) == 3 and next(fresh) == 2   # the iterator resumes where it was
  assert ckpt.saved_config(3)["train"]["num_steps"] == config.train.num_steps
  ckpt.close()
  # runs.py (evaluate / predict / report) reads the same workdir URI.
  step, saved = runs.saved_config("gs://bucket/run")
  assert step == 3 and saved["seed"] == config.seed
  assert runs.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
  with pytest.raises(FileNotFoundError, match="workdir gs://bucket/other does not exist"):
    runs.saved_config("gs://bucket/other")


_TRAIN = {"train.num_steps": 2, "model.connector.budgets": (16,), "eval.budgets": (16,)}


def test_train_and_eval_on_a_gs_workdir(orbax_on_fake_gcs, fake_gcs, no_os_calls_on_uris):
  """train.py end to end on gs://: makedirs, metrics, checkpoints and eval.json (~1 min)."""
  from parcel_jax import train
  from tests.util import tiny_config
  result = train.train_and_evaluate(tiny_config(**_TRAIN), "gs://bucket/run")
  run = fake_gcs / "bucket" / "run"
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2]
  assert json.loads((run / "eval.json").read_text()) == json.loads(json.dumps(result))
  assert [p.name for p in (run / "checkpoints").iterdir()] == ["2"]
  assert (run / "checkpoints" / "2" / "commit_success.txt").exists()
  assert len(list((run / "tensorboard").iterdir())) == 1


@pytest.mark.slow
def test_train_resumes_on_a_gs_workdir(orbax_on_fake_gcs, fake_gcs, no_os_calls_on_uris):
  """Stop at step 1, then resume from the gs:// checkpoint (~2 min)."""
  from parcel_jax import train
  from tests.util import tiny_config
  assert train.train_and_evaluate(tiny_config(**_TRAIN, **{"train.stop_at": 1}), "gs://bucket/run") == \
      {"stopped_at": 1}
  train.train_and_evaluate(tiny_config(**_TRAIN), "gs://bucket/run")  # resumes at step 1
  run = fake_gcs / "bucket" / "run"
  assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  assert (run / "eval.json").exists()
  assert len(list((run / "tensorboard").iterdir())) == 2  # one events file per run
