"""A TFDS dataset of LLaVA records (`llava_records/NAME`), prepared in ArrayRecord format.

    python -m llava_jax.data.pack --data-path X.json --image-folder I --output DATA_DIR --format tfds --name NAME
    # a stage's data: "tfds:llava_records/NAME"  (config.data.tfds_data_dir = DATA_DIR)

Building needs tensorflow-datasets (`pip install 'llava_jax[tfds]'`) but not TensorFlow: the
images are handed to TFDS as their encoded file bytes, which it stores as they are (TFDS needs
TensorFlow only to encode numpy images, which this builder never gives it). Reading, through
`tfds.data_source`, needs numpy only.

Features: `id` (text), `conversations` (the turns as JSON text), `image` (the original relative
paths), `images` (the encoded bytes), `video` (the original relative path, "" for none) and `videos`
(the video file's bytes: none or one; frames are sampled when training reads them, as from packed shards). Records keep the data file's order (shuffling is off),
and the dataset's metadata holds per record what the planner needs (`record_stats`), so that
opening it reads no record. Bad records are skipped and listed in the metadata (`skipped`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from llava_jax.data import image as image_lib
from llava_jax.data import records as records_lib
from llava_jax.data.packed_format import VideoError, load_input, read_example, record_stats

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LlavaRecordsConfig(tfds.core.BuilderConfig):
    """A config per data file: `name` (e.g. mix665k), the LLaVA data file and its image folder."""

    data_path: str = ""
    image_folder: str = ""


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
    """LLaVA conversation records with their images' encoded bytes."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "Videos (video, videos)."}
    BUILDER_CONFIG_CLASS = LlavaRecordsConfig

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA visual instruction records (llava_jax.data.tfds_builder).",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "conversations": tfds.features.Text(),
                "image": tfds.features.Sequence(tfds.features.Text()),
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
                "video": tfds.features.Text(),
                "videos": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            }),
            disable_shuffling=True,  # the data file's order: the same plan as the JSON source
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data file and images are local or on GCS
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        records, skipped, _ = load_input(cfg.data_path)
        stats = []
        for index, record in records:
            try:
                images = read_example(record, cfg.image_folder)
            except (records_lib.ImagePathError, image_lib.ImageError, VideoError, OSError) as e:
                skipped.append({"index": index, "id": record["id"], "reason": str(e)})
                logger.warning("tfds: skipped record %d (id %r): %s", index, record["id"], e)
                continue
            stats.append(record_stats(record))
            video = records_lib.record_video(record)
            videos = [images.pop()] if video is not None else []  # read_example puts the video's bytes last
            yield index, {"id": str(record["id"]), "conversations": json.dumps(record["conversations"], ensure_ascii=False),
                          "image": records_lib.record_images(record), "images": images, "video": video or "",
                          "videos": videos}
        # Filled during generation, written with the dataset info when preparation completes.
        self.info.metadata["record_stats"] = {"train": {
            "words": [s[0] for s in stats], "num_images": [s[1] for s in stats], "has_image": [bool(s[2]) for s in stats]}}
        self.info.metadata["skipped"] = sorted(skipped, key=lambda x: x["index"])


def build(data_path: str | os.PathLike, image_folder: str | os.PathLike, data_dir: str | os.PathLike,
          name: str) -> dict[str, Any]:
    """Prepares `llava_records/NAME` in `data_dir` (ArrayRecord files); returns counts."""
    config = LlavaRecordsConfig(name=name, data_path=os.fspath(data_path), image_folder=os.fspath(image_folder))
    builder = LlavaRecords(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    skipped = builder.info.metadata.get("skipped", [])
    return {"num_records": builder.info.splits["train"].num_examples, "num_skipped": len(skipped)}
