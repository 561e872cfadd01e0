"""Pretrained checkpoints: import Hugging Face models as run directories and export runs as
Hugging Face models (Llama, Mistral, Qwen2, Qwen3, GPT-2).

  architectures.py   config.json <-> the `model` section, and the parameter-name table
  safetensors_io.py  memory-mapped reading and streamed writing of safetensors files
  hf_import.py       a Hugging Face directory -> a run directory with a step-0 checkpoint
  hf_export.py       a run's checkpoint -> a directory `from_pretrained` loads

`convert.py` at the repository root is the command line.
"""
