"""The same records read in memory (jsonl -> MixtureSampler) and streamed (MDS stream dir -> the streaming
library) give the same mixture (samples of each source an epoch) and the same epoch end through the training
loader (src/data/position.py EpochLoader): docs/data.md, "One data path"."""

import json
from collections import Counter
from pathlib import Path

import pytest

from data_prep.common import RecordWriter
from src.data.mixture import MixtureSampler
from src.data.position import ResumableDataModule
from src.data.sources import DrawnRecords, RecordDataset, SourceConfig, read_source
from src.data.stream import FORMAT, MANIFEST, StreamSettings
from tests.test_stream import clean_streaming_leftovers

pytestmark = pytest.mark.smoke

SIZES, WEIGHTS = {"big": 30, "small": 10}, {"big": 3.0, "small": 2.0}
EPOCH, BATCH = 27, 4  # shares 16.2 and 10.8: 16 + 11 by the library's rounding; 7 batches, the last of 3


@pytest.fixture(scope="module")
def same_records(tmp_path_factory) -> tuple[Path, Path]:
    """Each source written twice by the same writer: as a jsonl and as an MDS stream."""
    jsonl, stream = tmp_path_factory.mktemp("jsonl"), tmp_path_factory.mktemp("stream")
    for out, as_stream in ((jsonl, False), (stream, True)):
        for name, n in SIZES.items():
            with RecordWriter(out, name, stream=as_stream, quiet=True) as w:
                for i in range(n):
                    w.write({"id": f"{name}/{i}", "source": name,
                             "turns": [{"role": None, "content": [{"text": f"text {i}"}]}]})
    (stream / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    clean_streaming_leftovers()
    yield jsonl, stream
    clean_streaming_leftovers()


def build(record, draw=None):
    return {"id": record["id"], "source": record["source"]}


class Records(ResumableDataModule):
    """The smallest record datamodule: identity samples, list batches; in memory or streamed."""

    def __init__(self, jsonl: Path, stream: Path | None) -> None:
        super().__init__()
        self.sources = [SourceConfig(path=str(jsonl / f"{n}.jsonl"), name=n, weight=w) for n, w in WEIGHTS.items()]
        self.stream = StreamSettings.of(str(stream), None, 1, self.sources) if stream else None
        self.batch_size, self.seed, self.num_workers = BATCH, 0, 0
        self.trainer = type("Trainer", (), {"training": True, "global_rank": 0, "world_size": 1, "local_rank": 0})()

    def setup(self, stage=None) -> None:
        if self.stream:
            self.train_set = self.open_train_stream(self.stream, self.sources, build, weighted=True,
                                                    epoch_size=EPOCH, draws=True)
            return
        parts = [RecordDataset(read_source(s), build) for s in self.sources]
        self.train_set = DrawnRecords(parts)
        self.train_sampler = MixtureSampler([len(p) for p in parts], [s.weight for s in self.sources],
                                            num_samples=EPOCH, seed=0, names=list(WEIGHTS), with_draws=True)

    def collate_fn(self):
        return list

    def epoch(self, loader) -> list[list[dict]]:
        """One iteration of the training loader, each batch consumed as the trainer would."""
        batches = list(loader)
        for b in batches:
            self.on_before_batch_transfer(b, 0)
        return batches


@pytest.mark.parametrize("streamed", [False, True], ids=["in_memory", "stream"])
def test_same_records_same_mixture_and_epoch_end_through_either_path(same_records, streamed):
    jsonl, stream = same_records
    dm = Records(jsonl, stream if streamed else None)
    dm.setup("fit")
    loader = dm.train_loader(dm.train_set, BATCH)
    for epoch in range(2):
        batches = dm.epoch(loader)
        # the epoch ends after its EPOCH samples: ceil(27 / 4) batches, the last one short
        assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 3], (epoch, [len(b) for b in batches])
        per_source = Counter(s["source"] for b in batches for s in b)
        assert per_source == {"big": 16, "small": 11}, (epoch, per_source)  # weights 3:2 of 27, exactly
        assert dm.state_dict()["epoch"] == epoch and dm.state_dict()["consumed"] == EPOCH
    assert dm.batches_per_epoch() == 7


def test_in_memory_shares_round_like_the_library():
    """floor(epoch x weight share), the shortfall to sources drawn by default_rng(seed) (the library's
    Stream.apply_weights; checked against it with 3 streams: 33 x 5:3:2 -> 16, 10, 7; 50 x 1:1:1 -> 16, 17, 17)."""
    assert MixtureSampler([30, 10, 5], [5.0, 3.0, 2.0], num_samples=33, seed=0).shares().tolist() == [16, 10, 7]
    assert MixtureSampler([30, 10, 5], [1, 1, 1], num_samples=50, seed=0).shares().tolist() == [16, 17, 17]
    s = MixtureSampler([30, 0, 5], [1.0, 0.0, 1.0], num_samples=7, seed=0)  # weight 0 is never drawn
    assert s.shares().tolist()[1] == 0 and sum(s.shares()) == 7
    assert Counter((s.indices(0) >= 30).tolist()) == {False: int(s.shares()[0]), True: int(s.shares()[2])}
