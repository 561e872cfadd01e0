"""Defaults shared by every config: each preset starts from `get_base_config()`.

Every key a user can override on the command line exists here, so a typo in
`--config.KEY=VALUE` fails at flag parsing instead of being silently ignored.
"""

from ml_collections import ConfigDict

# Logical axis -> mesh axes. This is the one place where model axis names meet the
# mesh; the model code only ever names logical axes. Order matters: the first rule
# that names a logical axis wins, and a mesh axis already used by an earlier
# dimension of the same array is dropped (the array is replicated over it).
DEFAULT_RULES = (
    # Parameters.
    ("layers", "pipeline"),  # contiguous blocks of layers per pipeline stage
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("experts", "expert"),
    ("router", None),
    # Activations.
    ("act_stages", "pipeline"),
    ("act_batch", ("data", "fsdp", "expert")),  # the expert axis is data-parallel outside MoE
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def get_base_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "base"

    # Training.
    c.steps = 2000
    c.batch_size = 12  # global, in sequences
    c.seq_len = 64
    c.seed = 0
    c.learning_rate = 1e-3
    c.min_learning_rate = 1e-4
    c.warmup_steps = 100
    c.weight_decay = 0.1
    c.grad_clip = 1.0
    c.grad_accum_steps = 1
    c.beta1 = 0.9
    c.beta2 = 0.99
    c.adam_eps = 1e-8

    # Intervals (in optimizer steps; 0 disables).
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.eval_batch_size = 256  # global, in windows of seq_len tokens
    c.eval_max_batches = 0  # 0 = the whole validation split

    c.model = ConfigDict()
    c.model.num_layers = 4
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.head_dim = 0  # 0 = d_model // num_heads
    c.model.d_ff = 512
    c.model.mlp = "gelu"  # gelu | swiglu
    c.model.dropout = 0.0
    c.model.tie_embeddings = True
    c.model.rope_theta = 10_000.0
    c.model.norm_eps = 1e-5
    c.model.init_std = 0.02
    c.model.dtype = "float32"  # compute dtype; parameters are always float32
    c.model.attention_impl = "xla"
    c.model.scan_layers = True
    # Rematerialise each block in the backward pass: with scanned layers this is also
    # the fastest choice on CPU (no stacked per-layer residual buffers).
    c.model.remat = "full"  # none | full | dots | dots_no_batch
    c.model.vocab_size = 0  # 0 = the data's vocabulary
    c.model.vocab_multiple = 128  # pad the vocabulary so every layout divides it

    # Mixture of experts: num_experts = 0 is a dense model.
    c.model.moe = ConfigDict()
    c.model.moe.num_experts = 0
    c.model.moe.top_k = 2
    c.model.moe.every = 1  # MoE in every k-th layer (the others dense)
    c.model.moe.num_shared_experts = 0  # always-on experts, added to the routed ones
    c.model.moe.d_ff = 0  # per expert; 0 = model.d_ff
    c.model.moe.capacity_factor = 0.0  # > 0: token dropping at this capacity; <= 0: dropless
    c.model.moe.router_order = "softmax_topk"  # softmax_topk | topk_softmax
    c.model.moe.renormalize = True  # top-k weights sum to 1 (softmax_topk)
    c.model.moe.jitter = 0.0  # multiplicative router-input noise in training
    # Dropless grouped matmul: ragged_dot, or padded blocks (auto: blocks on CPU only).
    c.model.moe.grouped_matmul = "auto"
    c.model.moe.load_balance_weight = 0.01  # Switch Transformer's E * sum_e f_e P_e
    c.model.moe.z_loss_weight = 0.001  # ST-MoE's mean logsumexp(router logits)^2

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 = all devices left after the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.pipeline = 1
    c.mesh.expert = 1
    # Pipeline parallelism (when mesh.pipeline > 1): the batch (after gradient
    # accumulation) is cut into this many micro-batches (0 = one per stage), and each
    # stage holds `pipeline_repeats` chunks of layers (> 1: the circular schedule).
    c.pipeline_microbatches = 0
    c.pipeline_repeats = 1

    c.sharding = ConfigDict()
    c.sharding.rules = DEFAULT_RULES

    # The objective: a weighted sum of registered terms (losses/objectives.py). A weight
    # of 0 means the term is not computed.
    c.loss = ConfigDict()
    c.loss.weights = ConfigDict()
    c.loss.weights.ce = 1.0  # next-token cross-entropy
    c.loss.weights.distill = 0.0  # logit distillation from loss.distill.teacher_workdir
    c.loss.weights.feature = 0.0  # hidden-state distillation (loss.feature)
    c.loss.distill = ConfigDict()
    c.loss.distill.teacher_workdir = ""  # a finished run of this codebase
    c.loss.distill.teacher_step = 0  # checkpoint step of the teacher; 0 = its latest
    # forward_kl KL(teacher||student) | reverse_kl | skew_forward_kl | skew_reverse_kl
    c.loss.distill.kind = "forward_kl"
    c.loss.distill.skew = 0.1  # skew KL mixing weight, in [0, 1)
    c.loss.distill.temperature = 1.0  # the loss is T^2 * KL at temperature T
    c.loss.distill.temperature_schedule = "constant"  # constant | linear | cosine
    c.loss.distill.temperature_final = 1.0  # T at the last step (linear / cosine)
    c.loss.distill.weight_schedule = "constant"  # constant | linear | cosine
    c.loss.distill.weight_final = 0.0  # distill weight at the last step (linear / cosine)
    c.loss.feature = ConfigDict()
    c.loss.feature.kind = "mse"  # mse | cosine
    c.loss.feature.layer_map = ""  # "S:T,S:T" student -> teacher block; "" = last:last

    # Quantization-aware training: fake-quantized weights (and activations) with a
    # straight-through estimator. 0 bits = float.
    c.quant = ConfigDict()
    c.quant.weight_bits = 0  # 0 | 8 | 4
    c.quant.activation_bits = 0  # 0 | 8 (per token, dynamic range)
    c.quant.granularity = "per_channel"  # per_channel | per_tensor | group size, e.g. "32"
    c.quant.symmetric = True

    c.data = ConfigDict()
    c.data.path = ""  # "" = the embedded tiny-Shakespeare corpus
    c.data.tokenizer = "char"  # char | byte
    c.data.val_fraction = 0.1
    c.data.prefetch = 2

    return c
