"""DPO on fixed synthetic preference pairs: the logged rewards as training goes.

  python benchmarks/dpo_pairs.py                       # LoRA (reference: its base), sigmoid
  python benchmarks/dpo_pairs.py --loss_type=ipo --beta=0.5 --steps=20

The tiny preset (2 layers, d_model 32) on 8 random pairs of 32 tokens (a shared 16-token
prompt, then two random responses) trains with LoRA rank 8 and its own base as the frozen
reference. Prints the DPO metrics every few steps: reward accuracy and margin should rise
from 0 while the loss falls from log 2, and the KL to the reference grows.
"""

from absl import app, flags
import jax
import numpy as np

from jaxlm.configs.shakespeare_char import get_config
from jaxlm.training.experiment import Experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("loss_type", "sigmoid", "loss.dpo.loss_type")
flags.DEFINE_float("beta", 0.1, "loss.dpo.beta")
flags.DEFINE_integer("steps", 30, "optimizer updates")
flags.DEFINE_string("workdir", "/tmp/dpo_pairs", "scratch run directory (nothing is saved)")

KEYS = ("loss", "dpo/rewards/accuracy", "dpo/rewards/margin", "dpo/rewards/chosen",
        "dpo/rewards/rejected", "dpo/kl")


def pairs(rows: int, length: int, vocab: int = 65) -> dict[str, np.ndarray]:
    """Random pairs: rows 2i (chosen) and 2i+1 (rejected) share their prompt."""
    ids = np.random.default_rng(0).integers(0, vocab, (rows, length + 1))
    ids[1::2, :length // 2] = ids[0::2, :length // 2]
    weights = np.zeros((rows, length), np.float32)
    weights[:, length // 2:] = 1
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "weights": weights}


def main(argv):
    del argv
    c = get_config("tiny")
    c.batch_size, c.seq_len, c.steps, c.warmup_steps, c.learning_rate = 16, 32, FLAGS.steps, 0, 3e-3
    c.loss.weights.ce, c.loss.weights.dpo, c.lora.rank = 0.0, 1.0, 8
    c.loss.dpo.loss_type, c.loss.dpo.beta = FLAGS.loss_type, FLAGS.beta
    exp = Experiment.build(c, FLAGS.workdir, jax.devices()[:1])
    state, batch = exp.init_state(), exp.to_global(pairs(c.batch_size, c.seq_len))
    print("| step | " + " | ".join(KEYS) + " |\n|" + " --- |" * (len(KEYS) + 1))
    for step in range(FLAGS.steps):
        state, m = exp.train_step(state, batch)
        if step % 5 == 0 or step == FLAGS.steps - 1:
            print(f"| {step} | " + " | ".join(f"{float(m[k]):.4f}" for k in KEYS) + " |")


if __name__ == "__main__":
    app.run(main)
