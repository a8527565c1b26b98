"""A local tfds builder: text / JSONL / Parquet corpora -> an ArrayRecord tfds dataset.

    python -m data_pipelines.tfds_corpus --name my_corpus --data_dir DIR SOURCE [SOURCE ...]

SOURCE is any spec of `data_pipelines.sources` (e.g. `jsonl:data/*.jsonl?field=body`). The
result is read back with `tfds:shakti_corpus/my_corpus?data_dir=DIR` (or
`tfds_dir:DIR/shakti_corpus/my_corpus/1.0.0`), with documents in the `text` feature, split
`train`. Bad records are skipped and counted in the printed summary.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.sources import DataError, open_source
from data_pipelines.cli import ArgumentParser, fail


class ShaktiCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents from local source specs, one `text` feature per example."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, sources: Sequence[str] = (), **kwargs):
        self._sources = tuple(sources)
        self.skipped: dict[str, int] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Local text corpus prepared by shakti-jax.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for s, spec in enumerate(self._sources):
            docs = open_source(spec)
            for i in range(len(docs)):
                doc = docs[i]
                if doc.text is None:
                    self.skipped[doc.problem] = self.skipped.get(doc.problem, 0) + 1
                    continue
                yield f"{s}:{i}", {"text": doc.text}


def prepare_corpus(name: str, sources: Sequence[str], data_dir: str) -> ShaktiCorpus:
    """Build (or reuse) `shakti_corpus/<name>` under `data_dir`; returns the builder."""
    for spec in sources:
        open_source(spec)  # fail on a bad spec before tfds creates anything
    config = tfds.core.BuilderConfig(name=name, description=f"sources: {', '.join(sources)}")
    builder = ShaktiCorpus(sources=sources, config=config, data_dir=data_dir,
                           file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="dataset config name")
    parser.add_argument("--data_dir", required=True, help="tfds data directory")
    parser.add_argument("sources", nargs="+", help="source specs, e.g. jsonl:FILE?field=text")
    args = parser.parse_args(argv)
    try:
        builder = prepare_corpus(args.name, args.sources, args.data_dir)
    except DataError as err:
        fail(str(err))
    count = builder.info.splits["train"].num_examples
    print(f"prepared {builder.info.full_name} with {count} documents in {builder.data_dir}; "
          f"skipped: {builder.skipped or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
