"""A local tfds builder: text / JSONL / Parquet corpora -> an ArrayRecord tfds dataset.

    python -m data_pipelines.tfds_corpus --name my_corpus --data_dir DIR SOURCE [SOURCE ...]

SOURCE is any spec of `data_pipelines.sources` (e.g. `jsonl:data/*.jsonl?field=body`). The
result is read back with `tfds:shakti_corpus/my_corpus?data_dir=DIR` (or
`tfds_dir:DIR/shakti_corpus/my_corpus/1.0.0`), with documents in the `text` feature, split
`train`. Bad records are skipped and counted in the printed summary.

A build records its source specs and the size and modification time of every file they read
(`metadata.json`); running again with the same name reuses the build only if these match, and
otherwise rebuilds it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import tensorflow_datasets as tfds

from data_pipelines.cli import ArgumentParser, run_main
from data_pipelines.sources import open_source, source_files


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
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

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
        self.info.metadata.update(inputs=inputs_fingerprint(self._sources), skipped=self.skipped)


def inputs_fingerprint(sources: Sequence[str]) -> list[dict[str, Any]]:
    """Each source spec with [path, size, mtime_ns] of every file it reads (JSON-ready)."""
    out = []
    for spec in sources:
        files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in source_files(spec)]
        out.append({"spec": spec, "files": files})
    return out


def prepare_corpus(name: str, sources: Sequence[str], data_dir: str) -> ShaktiCorpus:
    """Build `shakti_corpus/<name>` under `data_dir`, or reuse a build of the same inputs.

    A build whose recorded inputs (specs, file sizes and times) differ is rebuilt, with a note
    on stderr. Returns the builder; `builder.skipped` counts bad records by problem.
    """
    for spec in sources:
        open_source(spec)  # fail on a bad spec before tfds creates anything
    config = tfds.core.BuilderConfig(name=name, description=f"sources: {', '.join(sources)}")
    builder = ShaktiCorpus(sources=sources, config=config, data_dir=data_dir,
                           file_format="array_record")
    mode = tfds.GenerateMode.REUSE_DATASET_IF_EXISTS
    built = _recorded_build(Path(builder.data_dir))
    if built is not None and built.get("inputs") != inputs_fingerprint(sources):
        print(f"note: the sources of {builder.data_dir} changed since it was built; rebuilding",
              file=sys.stderr)
        mode = tfds.GenerateMode.FORCE_REDOWNLOAD
    elif built is not None:
        builder.skipped = built.get("skipped", {})
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


def _recorded_build(folder: Path) -> dict[str, Any] | None:
    """The metadata of an existing build in `folder` ({} if it has none), or None if unbuilt."""
    if not (folder / "dataset_info.json").is_file():
        return None
    path = folder / "metadata.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="dataset config name")
    parser.add_argument("--data_dir", required=True, help="tfds data directory")
    parser.add_argument("sources", nargs="+", help="source specs, e.g. jsonl:FILE?field=text")
    args = parser.parse_args(argv)
    builder = prepare_corpus(args.name, args.sources, args.data_dir)
    count = builder.info.splits["train"].num_examples
    print(f"prepared {builder.info.full_name} with {count} documents in {builder.data_dir}; "
          f"skipped: {builder.skipped or 'none'}")
    return 0


if __name__ == "__main__":
    run_main(main)
