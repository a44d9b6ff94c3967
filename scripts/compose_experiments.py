"""Dump the composed config of every experiment (OmegaConf.to_yaml, resolved, keys sorted) into a folder, one file
each: run it before and after a conf/ change and `diff -r` the two folders.

Usage: PYTHONPATH=. python scripts/compose_experiments.py OUT_DIR
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from tests.helpers import CONF, compose_cfg

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for p in sorted((CONF / "experiment").glob("*.yaml")):
    cfg = compose_cfg(p.stem, "/tmp/OUT")  # a fixed output dir: the dumps differ only where the configs do
    (out / f"{p.stem}.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True))
print("dumped", len(list(out.glob("*.yaml"))))
