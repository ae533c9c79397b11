"""Real data: the Gemma tokenizer and PaliGemma's layout, image decoding, the LLaVA / jsonl /
TFDS sources, and the bad-data policies (raise / skip) for every kind of bad example.
Every file is written here: real PNG/JPEG/GIF images, JSON, jsonl and ArrayRecord."""

import io
import json
import os
import pickle

import ml_collections
import numpy as np
import pytest

from tests import paligemma_fixtures as fx
from parcel_jax.data import gemma_tokenizer, images, pipeline

S = 16          # decoded image size
MAX_LEN = 24    # data.max_text_len
LONG = " ".join(["the red square is left of the blue circle"] * 6)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  fx.train_sentencepiece(str(d / "tokenizer.model"))
  return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
  return gemma_tokenizer.GemmaTokenizer(tok_dir)


# ----------------------------------------------------------------------- tokenizer

def test_gemma_tokenizer_specials_and_location_tokens(tok, tok_dir, tmp_path):
  assert tok.path.endswith("tokenizer.model")
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.sep_ids == (tok.sep_id,) and tok.encode("\n") == [tok.sep_id]
  assert len(tok.loc_ids) == 1024 and len(tok.seg_ids) == 128
  ids = tok.encode("detect cat <loc0012><loc1023> <seg005>")
  assert tok.loc_ids[12] in ids and tok.loc_ids[1023] in ids and tok.seg_ids[5] in ids
  assert tok.box_tokens(0.0, 0.5, 0.999, 1.0) == "<loc0000><loc0512><loc1022><loc1023>"
  assert tok.decode(tok.encode("the cat is left of the dog") + [tok.eos_id, 7, 8]) == "the cat is left of the dog"
  clone = pickle.loads(pickle.dumps(tok))  # Grain may copy transforms
  assert clone.encode("two red squares") == tok.encode("two red squares")
  # A vocabulary without PaliGemma's extra tokens: loc/seg ids are None.
  plain = gemma_tokenizer.GemmaTokenizer(fx.train_sentencepiece(str(tmp_path / "p.model"), loc_tokens=False))
  assert plain.loc_ids is None and plain.seg_ids is None
  with pytest.raises(ValueError, match="no <locNNNN> tokens"):
    plain.loc_token(0.5)
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    gemma_tokenizer.GemmaTokenizer(str(tmp_path))


def test_tokenizer_json_matches_sentencepiece(tok, tok_dir, tmp_path):
  """tokenizer.json (the `tokenizers` library) gives the sentencepiece model's ids."""
  transformers = pytest.importorskip("transformers")
  hf_tok = transformers.GemmaTokenizer.from_pretrained(tok_dir)
  hf_tok.save_pretrained(str(tmp_path))
  if (tmp_path / "tokenizer.model").exists():  # keep only tokenizer.json
    (tmp_path / "tokenizer.model").unlink()
  json_tok = gemma_tokenizer.GemmaTokenizer(str(tmp_path))
  assert json_tok.path.endswith("tokenizer.json")
  assert (json_tok.pad_id, json_tok.eos_id, json_tok.bos_id, json_tok.sep_ids) == \
      (tok.pad_id, tok.eos_id, tok.bos_id, tok.sep_ids)
  np.testing.assert_array_equal(json_tok.loc_ids, tok.loc_ids)
  for text in ["what colour is the cat\n<loc0012>red", " two  three", "how many circles are there?",
               "caption en", LONG]:
    assert json_tok.encode(text) == tok.encode(text), text
  # As PaliGemma's HF processor tokenizes it: BOS + (prefix + "\n"), then suffix + EOS.
  prefix, suffix = "how many red squares", "two"
  ours, _ = gemma_tokenizer.layout_example(json_tok, prefix, suffix, 32)
  n = int(ours["text_mask"].sum())
  expected = [hf_tok.bos_token_id] + hf_tok.encode(prefix + "\n", add_special_tokens=False) + \
      hf_tok.encode(suffix, add_special_tokens=False) + [hf_tok.eos_token_id]
  assert list(ours["text"][:n]) == expected


def test_paligemma_layout(tok):
  prefix, suffix = "what colour is the square", "red"
  p, s = tok.encode(prefix), tok.encode(suffix)
  out, truncated = gemma_tokenizer.layout_example(tok, prefix, suffix, MAX_LEN)
  n = len(p) + len(s) + 3
  assert not truncated
  expected = [tok.bos_id, *p, tok.sep_id, *s, tok.eos_id] + [tok.pad_id] * (MAX_LEN - n)
  np.testing.assert_array_equal(out["text"], expected)
  pos = np.arange(MAX_LEN)
  start = len(p) + 2
  np.testing.assert_array_equal(out["text_mask"], pos < n)
  np.testing.assert_array_equal(out["ar_mask"], (pos >= start) & (pos < n))
  np.testing.assert_array_equal(out["loss_mask"], (pos >= start - 1) & (pos < n - 1))
  np.testing.assert_array_equal(out["targets"], np.append(out["text"][1:], tok.pad_id))
  # Too long: truncate keeps the prefix and cuts the suffix tail (EOS first); reject raises.
  out, truncated = gemma_tokenizer.layout_example(tok, prefix, LONG, MAX_LEN, "truncate")
  assert truncated and out["text_mask"].all() and tok.eos_id not in out["text"]
  assert list(out["text"][:start]) == [tok.bos_id, *p, tok.sep_id]
  with pytest.raises(gemma_tokenizer.TextTooLong, match="data.max_text_len is 24"):
    gemma_tokenizer.layout_example(tok, prefix, LONG, MAX_LEN, "reject")
  with pytest.raises(gemma_tokenizer.TextTooLong, match="prefix alone does not fit"):
    gemma_tokenizer.layout_example(tok, LONG, "red", MAX_LEN, "truncate")


# -------------------------------------------------------------------------- images

def _solid_png(path, colour, mode="RGB", size=(40, 30)):
  from PIL import Image
  Image.new(mode, size, colour).save(path, "PNG")
  return path


@pytest.mark.parametrize("kind", ["rgb", "jpeg", "gray", "rgba", "palette", "gif"])
def test_decode_image_formats(kind, tmp_path):
  from PIL import Image
  path = fx.write_image(str(tmp_path / f"x.{kind}"), kind, size=(37, 23))  # non-square
  got = images.decode_image(path, S)
  assert got.shape == (S, S, 3) and got.dtype == np.float32
  assert got.min() >= -1 and got.max() <= 1
  img = Image.open(path)
  ref = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
  ref = np.asarray(ref.resize((S, S), Image.BILINEAR), np.float32) / 127.5 - 1
  np.testing.assert_array_equal(got, ref)
  if kind == "gray":
    np.testing.assert_array_equal(got[..., 0], got[..., 2])


def test_decode_image_values(tmp_path):
  got = images.decode_image(_solid_png(str(tmp_path / "c.png"), (255, 0, 51)), S)
  np.testing.assert_allclose(got, np.broadcast_to([1.0, -1.0, 51 / 127.5 - 1], (S, S, 3)), atol=1e-6)
  got = images.decode_image(_solid_png(str(tmp_path / "a.png"), (10, 20, 30, 0), "RGBA"), S)
  np.testing.assert_allclose(got[0, 0], np.array([10, 20, 30]) / 127.5 - 1, atol=1e-6)  # alpha dropped
  with open(tmp_path / "c.png", "rb") as f:
    np.testing.assert_array_equal(images.decode_image(f.read(), S)[..., 0], 1.0)  # bytes too


@pytest.mark.parametrize("kind,expected", [("truncated", "corrupt_image"), ("corrupt", "corrupt_image"),
                                           ("notimage", "unreadable_image"), ("empty", "unreadable_image")])
def test_decode_image_bad(kind, expected, tmp_path):
  path = fx.write_image(str(tmp_path / f"bad_{kind}.img"), kind)
  with pytest.raises(images.BadExample) as e:
    images.decode_image(path, S)
  assert e.value.kind == expected and path in str(e.value)
  with pytest.raises(images.BadExample) as e:
    images.decode_image(str(tmp_path / "nope.png"), S)
  assert e.value.kind == "missing_image"


# ---------------------------------------------------------------- LLaVA + policies

def _turns(q, a):
  return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  """A LLaVA folder with one example of every bad kind. Returns (json path, {example: kind})."""
  root = tmp_path_factory.mktemp("llava")
  img = lambda name, kind, **kw: os.path.relpath(fx.write_image(str(root / "images" / name), kind, **kw), root)
  good = [
      {"id": "0", "image": img("a.png", "rgb"), "conversations": _turns("what colour is the cat", "red")
       + [{"from": "human", "value": "where is the dog"}, {"from": "gpt", "value": "left"}]},
      {"id": "1", "image": img("b.jpg", "jpeg", size=(50, 20)), "conversations": _turns("how many", "two")},
      {"id": "2", "image": img("c.png", "gray"), "conversations": _turns("describe", "a square")},
      {"id": "3", "image": img("d.png", "rgba"), "conversations": _turns("what shape", "circle")},
      {"id": "4", "image": img("e.png", "palette"), "conversations": _turns("is it big", "yes")},
  ]
  bad = [
      ("missing_image", {"image": "images/missing.png", "conversations": _turns("q", "a")}),
      ("corrupt_image", {"image": img("t.jpg", "truncated"), "conversations": _turns("q", "a")}),
      ("corrupt_image", {"image": img("k.png", "corrupt"), "conversations": _turns("q", "a")}),
      ("unreadable_image", {"image": img("n.png", "notimage"), "conversations": _turns("q", "a")}),
      ("malformed_record", "just a string"),
      ("malformed_record", {"image": img("f.png", "rgb"), "conversations": _turns("q", "a")[::-1]}),
      ("missing_field", {"image": img("j.png", "rgb"), "id": "no conversations"}),
      ("missing_field", {"image": img("g.png", "rgb"), "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),
      ("empty_answer", {"image": img("h.png", "rgb"), "conversations": _turns("q", "   ")}),
      ("text_too_long", {"image": img("i.png", "rgb"), "conversations": _turns("describe", LONG)}),
  ]
  records = good + [r for _, r in bad]
  path = root / "data.json"
  path.write_text(json.dumps(records))
  kinds = {6 + i: k for i, (k, _) in enumerate(bad)}  # record 0 has two exchanges
  return str(path), kinds, ("red", "left", "two", "a square", "circle", "yes")


def _cfg(name, path, tok_dir, **kw):
  """A real-data config; LLaVA examples one per exchange (the fixture's indices), unless
  ``conversation`` says otherwise."""
  return ml_collections.ConfigDict({**dict(
      name=name, image_size=S, max_text_len=MAX_LEN, train_path=path, eval_path=path,
      tokenizer=tok_dir, on_error="raise", max_skip_fraction=1.0, long_text="reject",
      train_size=1, eval_size=1, families=(), conversation="single_exchange"), **kw})


def test_llava_source_records(llava, tok_dir):
  path, kinds, answers = llava
  source = pipeline.build_source(_cfg("llava", path, tok_dir), "train")
  assert len(source) == 16
  ex = source[1]
  assert (ex["question"], ex["answer"], int(ex["family"])) == ("where is the dog", "left", -1)
  assert ex["image"].shape == (S, S, 3) and source.describe(1) == "example 1 (record 0, exchange 1)"
  assert source[0]["question"] == "what colour is the cat"  # <image> placeholder removed


def test_llava_raise_names_file_example_and_problem(llava, tok_dir):
  path, kinds, _ = llava
  ds = pipeline.build_eval_dataset(_cfg("llava", path, tok_dir), batch_size=1)
  assert ds[0]["valid"].all()
  for example, kind in kinds.items():
    with pytest.raises(pipeline.BadDataError) as e:
      ds[example]
    msg = str(e.value)
    assert path in msg and f"example {example} (record {example - 1}" in msg and f": {kind}: " in msg, msg
  it = iter(pipeline.build_train_dataset(_cfg("llava", path, tok_dir), seed=0, global_batch_size=16))
  with pytest.raises(pipeline.BadDataError, match="data.on_error=raise"):
    next(it)


def test_llava_skip_counts_every_kind(llava, tok_dir):
  path, kinds, answers = llava
  cfg = _cfg("llava", path, tok_dir, on_error="skip")
  ds = pipeline.build_eval_dataset(cfg, batch_size=16)
  (batch,) = list(ds)
  np.testing.assert_array_equal(batch["valid"], [i not in kinds for i in range(16)])
  counts = ds.bad_data_stats.as_dict()
  for kind in images.BAD_KINDS:
    assert counts[f"skipped_{kind}"] == list(kinds.values()).count(kind), kind
  assert counts["seen"] == 16 and counts["skipped"] == len(kinds)
  assert not batch["text_mask"][~batch["valid"]].any()

  # Train: bad examples are dropped, batches stay full, counts exposed for the logs.
  tok = pipeline.build_tokenizer(cfg)
  train = pipeline.build_train_dataset(cfg, seed=1, global_batch_size=4, num_threads=2)
  it = iter(train)
  batches = [next(it) for _ in range(3)]  # 12 > 7 good examples: crosses an epoch
  it.close()
  for b in batches:
    assert b["image"].shape == (4, S, S, 3) and b["loss_mask"].any(1).all()
    for text, ar in zip(b["text"], b["ar_mask"]):
      assert tok.decode(text[ar]) in answers
  logged = pipeline.data_metrics(train)
  assert all(logged[f"data/skipped_{k}"] >= 1 for k in images.BAD_KINDS)
  # Truncation instead of rejection: the long example is used, truncated.
  cfg = _cfg("llava", path, tok_dir, on_error="skip", long_text="truncate")
  ds = pipeline.build_eval_dataset(cfg, batch_size=16)
  (batch,) = list(ds)
  assert batch["valid"][15] and batch["text_mask"][15].all()
  assert ds.bad_data_stats.as_dict()["truncated"] == 1


def test_skip_fraction_limit(llava, tok_dir):
  path, kinds, _ = llava
  cfg = _cfg("llava", path, tok_dir, on_error="skip", max_skip_fraction=0.2)
  it = iter(pipeline.build_train_dataset(cfg, seed=0, global_batch_size=8))
  with pytest.raises(pipeline.BadDataError, match=r"more than data.max_skip_fraction=0.2 allows"):
    next(it)
  it.close()


def test_unusable_files_and_config_errors(tmp_path, tok_dir):
  broken = tmp_path / "broken.json"
  broken.write_text('[{"image": "a.png", "conversations": [')
  with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
    pipeline.build_source(_cfg("llava", str(broken), tok_dir), "train")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.build_source(_cfg("jsonl", str(tmp_path / "none.jsonl"), tok_dir), "train")
  with pytest.raises(ValueError, match=r"data.name must be one of \('synthetic', 'llava', 'jsonl', 'tfds'\)"):
    pipeline.build_source(_cfg("coco", "x", tok_dir), "train")
  with pytest.raises(ValueError, match="data.on_error='ignore' is unknown"):
    pipeline.build_source(_cfg("llava", "x", tok_dir, on_error="ignore"), "train")
  with pytest.raises(ValueError, match="data.long_text='cut' is unknown"):
    pipeline.build_source(_cfg("llava", "x", tok_dir, long_text="cut"), "train")
  with pytest.raises(ValueError, match="data.tokenizer must name"):
    pipeline.build_source(_cfg("llava", "x", ""), "train")


# ------------------------------------------------------------------------- jsonl

def test_jsonl_source_and_policies(tmp_path, tok_dir):
  img = lambda name, kind: fx.write_image(str(tmp_path / "img" / name), kind)
  img("a.png", "rgb"), img("b.jpg", "jpeg"), img("t.jpg", "truncated"), img("n.png", "notimage")
  lines = [
      json.dumps({"image": "img/a.png", "prefix": "caption en", "suffix": "a red square"}),
      "",  # blank lines are not examples
      '{"image": "img/b.jpg", "prefix": "caption en", ',                          # 1 malformed
      json.dumps([1, 2]),                                                          # 2 malformed
      json.dumps({"image": "img/b.jpg", "prefix": "caption en"}),                  # 3 missing suffix
      json.dumps({"image": "img/b.jpg", "prefix": "q", "suffix": ""}),             # 4 empty answer
      json.dumps({"image": "img/zz.png", "prefix": "q", "suffix": "a"}),           # 5 missing image
      json.dumps({"image": "img/t.jpg", "prefix": "q", "suffix": "a"}),            # 6 corrupt
      json.dumps({"image": "img/n.png", "prefix": "q", "suffix": "a"}),            # 7 unreadable
      json.dumps({"image": "img/b.jpg", "prefix": "q", "suffix": LONG}),           # 8 too long
      json.dumps({"image": "img/b.jpg", "prefix": "how many", "suffix": "two"}),   # 9 good
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(lines) + "\n")
  kinds = {1: "malformed_record", 2: "malformed_record", 3: "missing_field", 4: "empty_answer",
           5: "missing_image", 6: "corrupt_image", 7: "unreadable_image", 8: "text_too_long"}
  cfg = _cfg("jsonl", str(path), tok_dir)
  source = pipeline.build_source(cfg, "eval")
  assert len(source) == 10 and source[9]["answer"] == "two"
  ds = pipeline.build_eval_dataset(cfg, batch_size=1)
  for example, kind in kinds.items():
    line = example + 2  # the blank line 2 is not an example
    with pytest.raises(pipeline.BadDataError, match=rf"data.jsonl: example {example} \(line {line}\): {kind}: "):
      ds[example]
  cfg = _cfg("jsonl", str(path), tok_dir, on_error="skip")
  ds = pipeline.build_eval_dataset(cfg, batch_size=10)
  (batch,) = list(ds)
  np.testing.assert_array_equal(batch["valid"], [i in (0, 9) for i in range(10)])
  counts = ds.bad_data_stats.as_dict()
  for kind in set(kinds.values()):
    assert counts[f"skipped_{kind}"] == list(kinds.values()).count(kind), kind


# -------------------------------------------------------------------------- TFDS

def _png(colour):
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (20, 12), colour).save(buf, "PNG")
  return buf.getvalue()


def test_tfds_array_record_source(tmp_path, tok_dir):
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()
  good = _png((255, 0, 0))
  rows = [(good, "caption en", "red"), (good[:40], "q", "a"), (b"garbage" * 9, "q", "a"),
          (good, "q", "  "), (good, "q", LONG), (_png((0, 0, 255)), "what colour", "blue")]

  class ParcelTinyVqa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "prefix": tfds.features.Text(),
          "suffix": tfds.features.Text(), "id": np.int32}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, prefix, suffix) in enumerate(rows):
        yield i, {"image": image, "prefix": prefix, "suffix": suffix, "id": i}

  ParcelTinyVqa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = _cfg("tfds", "", tok_dir, tfds_name="parcel_tiny_vqa", tfds_data_dir=str(tmp_path))
  source = pipeline.build_source(cfg, "eval")
  assert len(source) == len(rows)
  ids = [int(source.raw._source[i]["id"]) for i in range(len(rows))]  # TFDS shuffles on write
  kinds = {1: "corrupt_image", 2: "unreadable_image", 3: "empty_answer", 4: "text_too_long"}
  ds = pipeline.build_eval_dataset(cfg, batch_size=1)
  for i, row in enumerate(ids):
    if row in kinds:
      with pytest.raises(pipeline.BadDataError, match=rf"example {i}: {kinds[row]}: "):
        ds[i]
    else:
      assert ds[i]["valid"].all()
  (red,) = [i for i, r in enumerate(ids) if r == 0]
  np.testing.assert_allclose(source[red]["image"][..., 0], 1.0)
  cfg = _cfg("tfds", "", tok_dir, tfds_name="parcel_tiny_vqa", tfds_data_dir=str(tmp_path), on_error="skip")
  ds = pipeline.build_eval_dataset(cfg, batch_size=len(rows))
  (batch,) = list(ds)
  np.testing.assert_array_equal(batch["valid"], [r not in kinds for r in ids])
  counts = ds.bad_data_stats.as_dict()
  assert [counts[f"skipped_{k}"] for k in kinds.values()] == [1, 1, 1, 1]
  with pytest.raises(ValueError, match="has no feature"):
    pipeline.build_source(_cfg("tfds", "", tok_dir, tfds_name="parcel_tiny_vqa",
                               tfds_data_dir=str(tmp_path), suffix_key="answer"), "eval")


# ------------------------------------------------------------ several images per example

def test_lists_of_images_are_frames_and_too_many_are_bad(tmp_path, tok_dir):
  """jsonl ``"images": [...]`` and LLaVA ``"image": [...]`` are one example of several
  frames, in order; more than data.max_frames is a bad example naming it (raise) or a counted
  skip; with max_frames = 1 a single image is unchanged."""
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
  names = [os.path.basename(_solid_png(str(tmp_path / f"f{i}.png"), c)) for i, c in enumerate(colours)]
  lines = [{"images": names[:2], "prefix": "what happens", "suffix": "red then green"},
           {"image": names[2], "prefix": "what colour", "suffix": "blue"},
           {"images": names, "prefix": "what happens", "suffix": "three"}]
  jsonl = tmp_path / "data.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in lines))
  records = [{"image": r.get("images", r.get("image")),
              "conversations": _turns(r["prefix"], r["suffix"])} for r in lines]
  llava_json = tmp_path / "data.json"
  llava_json.write_text(json.dumps(records))
  for name, path in (("jsonl", jsonl), ("llava", llava_json)):
    cfg = _cfg(name, str(path), tok_dir, max_frames=2)
    ds = pipeline.build_eval_dataset(cfg, batch_size=1, num_examples=2)
    clip, image = ds[0], ds[1]
    assert clip["image"].shape == (1, 2, S, S, 3)
    np.testing.assert_array_equal(clip["frame_mask"], [[True, True]])
    np.testing.assert_array_equal(image["frame_mask"], [[True, False]])
    for frame, colour in zip(clip["image"][0], colours):   # in order, decoded like one image
      np.testing.assert_allclose(frame.mean((0, 1)), np.asarray(colour) / 127.5 - 1, atol=1e-6)
    assert not image["image"][0, 1].any()
    with pytest.raises(pipeline.BadDataError) as e:
      pipeline.build_eval_dataset(cfg, batch_size=1)[2]
    assert str(path) in str(e.value) and "example 2" in str(e.value)
    assert "3 images (frames), more than data.max_frames=2" in str(e.value)
    skip = pipeline.build_eval_dataset(_cfg(name, str(path), tok_dir, max_frames=2, on_error="skip"),
                                       batch_size=3)
    (batch,) = list(skip)
    np.testing.assert_array_equal(batch["valid"], [True, True, False])
    assert skip.bad_data_stats.as_dict()["skipped_malformed_record"] == 1
    assert not batch["frame_mask"][2].any()
    single = pipeline.build_eval_dataset(_cfg(name, str(path), tok_dir), batch_size=1)[1]
    assert single["image"].shape == (1, S, S, 3) and "frame_mask" not in single
    np.testing.assert_array_equal(single["image"][0], image["image"][0, 0])
