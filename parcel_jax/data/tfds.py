"""TFDS datasets prepared as ArrayRecord, read through ``tfds.data_source`` (no TensorFlow).

``tfds.data_source(name, split=..., data_dir=...)`` gives random access to a dataset that
``download_and_prepare(file_format='array_record')`` wrote (tensorflow-datasets 4.9 reads
and writes it without TensorFlow installed). Each record needs an image feature (encoded
bytes: it is read undecoded, ``tfds.decode.SkipDecoding``, and decoded by
``images.decode_image`` like every other source) and two text features; their names are
``data.image_key`` / ``data.prefix_key`` / ``data.suffix_key``.
"""

from __future__ import annotations

from parcel_jax.data.images import BadExample


class TfdsSource:
  """Random access to (image bytes, prefix, suffix) examples of a prepared TFDS dataset."""

  def __init__(self, name: str, split: str, data_dir: str = "", *, image_key: str = "image",
               prefix_key: str = "prefix", suffix_key: str = "suffix"):
    import tensorflow_datasets as tfds  # lazy: only this source needs it

    self.name, self.split = name, split
    self.keys = (image_key, prefix_key, suffix_key)
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for unknown datasets
      raise ValueError(f"TFDS dataset {name!r} not found in data_dir={data_dir!r} ({e})") from e
    features = builder.info.features
    missing = [k for k in self.keys if k not in features]
    if missing:
      raise ValueError(f"TFDS dataset {name!r} has no feature(s) {missing}; it has {sorted(features)}")
    self.path = f"{builder.data_dir}[{split}]"
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                    decoders={image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._source)

  def describe(self, index: int) -> str:
    return f"example {index}"

  def __getitem__(self, index: int) -> dict:
    try:
      rec = self._source[index]
    except Exception as e:  # noqa: BLE001 - a damaged record fails to parse
      raise BadExample("malformed_record", f"record cannot be parsed ({type(e).__name__}: {e})") from e
    image_key, prefix_key, suffix_key = self.keys
    out = {}
    for key in self.keys:
      value = rec.get(key)
      if value is None:
        raise BadExample("missing_field", f"no field {key!r}")
      out[key] = value
    texts = []
    for key in (prefix_key, suffix_key):
      value = out[key]
      texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    prefix, suffix = (t.strip() for t in texts)
    if not suffix:
      raise BadExample("empty_answer", f"field {suffix_key!r} is empty")
    image = out[image_key]
    if not isinstance(image, bytes) or not image:
      raise BadExample("missing_field", f"field {image_key!r} holds no encoded image bytes")
    return {"image": image, "prefix": prefix, "suffix": suffix}

  def __repr__(self) -> str:
    return f"TfdsSource({self.path!r}, {len(self)} examples)"
