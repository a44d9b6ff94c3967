"""Benchmark scoring without the hub: VLMEvalKit-layout TSV files in, scores and prediction files out."""
