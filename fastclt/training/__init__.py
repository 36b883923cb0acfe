"""The pieces of ``python -m fastclt.train`` (see docs/TRAINING.md):

config        RunConfig: model / train / data / eval / checkpoint / log sections; the command line
              (jsonargparse over the section dataclasses: YAML + ``--section.key value``)
parallel      tensor parallel over features (exact TopK/BatchTopK across shards) × data parallel
data          activation sources (synthetic, shards on disk, on-the-fly HF) and the prefetcher
synthetic     planted-feature activations and ``mmcs``
extract       MLP input/output capture from a local Hugging Face causal LM; shard writer
checkpointing per-rank safetensors checkpoints, verification, resume, merge
rundir        the run folder's lock (one writer) and workers that die with their launcher
metrics       JSONL, progress bar, wandb/TensorBoard, summary.json / summary.png
"""
