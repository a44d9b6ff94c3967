"""Progress bars of long loops (src/utils/progress.py): written / skipped counts beside the bar on a terminal,
nothing at all when stderr is not one (logs, CI, captured output)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from src.utils.progress import progress

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_shows_the_counts_and_a_pipe_shows_nothing():
    seen = {"written": 0, "skipped": 0}
    term, pipe = Terminal(), io.StringIO()
    for file in (term, pipe):
        seen.update(written=0, skipped=0)
        for i in progress(range(5), "convert", counts=lambda: dict(seen), file=file):
            seen["written" if i % 2 == 0 else "skipped"] += 1
    assert pipe.getvalue() == ""
    final = term.getvalue().split("\r")[-1]
    assert "convert" in final and "5/5" in final and "written=3" in final and "skipped=2" in final


def test_write_stream_shows_written_and_skipped_records(tmp_path, monkeypatch):
    from data_prep.write_stream import write_stream
    from src.data.sources import SourceConfig

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    manifest = write_stream([SourceConfig(path=str(ROOT / "assets" / "sample" / "captions.jsonl"))], tmp_path,
                            quiet=True)
    entry = manifest["sources"]["captions"]
    last = re.findall(r"written=(\d+), skipped=(\d+)", term.getvalue())[-1]
    assert (int(last[0]), int(last[1])) == (entry["records"], entry["skipped_total"]) == (10, 2)
