"""eval.py's request: which checkpoints, which data, what to generate (typed flags)."""

from typing import ClassVar, Literal

from pydantic import model_validator

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import PositiveFloat, PositiveInt, Prune, Sampling, Section, require
from jaxlm.models.gptq import GptqSettings


class Generate(Section):
    """eval.py's generation flags besides the sampling rules."""
    length: PositiveInt = 500  # tokens to generate per prompt
    seed: int = 0
    draft_tokens: PositiveInt = 4  # speculative decoding: tokens the draft proposes per round
    num_beams: PositiveInt = 1  # > 1: beam search (deterministic; the sampling flags unused)
    length_penalty: float = 1.0  # beam search: hypothesis score = sum logprob / length**this
    early_stopping: Literal["true", "false", "never"] = "false"  # as `transformers`' generate

    def early_stopping_value(self) -> bool | str:
        """`early_stopping` as `transformers` spells it: True, False or "never"."""
        return {"true": True, "false": False}.get(self.early_stopping, self.early_stopping)


class EvalRequest(Section):
    """eval.py's flags: which checkpoints, which data, what to generate."""
    FLAT_KEYS: ClassVar[bool] = True  # errors name the flag (--top_p), not sampling.top_p
    workdir: str
    step: int | None = None  # default: the latest checkpoint
    evaluate: bool = True
    sample: bool = False
    prompts: tuple[str, ...] = ("\n",)
    sampling: Sampling = Sampling(temperature=0.8)
    generate: Generate = Generate()
    all_steps: bool = False
    data: str | None = None
    draft_workdir: str | None = None
    draft_step: int | None = None
    compare: bool = True
    quantize: Literal["int8", "int4", "int3", "nf4"] | None = None
    quant_granularity: str | None = None
    quant_symmetric: bool | None = None
    generation_set: str | None = None  # JSON lines of prompts and references: BLEU/chrF/ROUGE
    prompt_field: str = "prompt"
    reference_field: str = "reference"
    stop: str | None = None  # a continuation ends before this string (besides EOS)
    batch_size: PositiveInt = 8  # prompts generated at once
    attention_maps: bool = False  # the prompt's per-layer, per-head attention maps
    lm_eval: tuple[str, ...] = ()  # lm-evaluation-harness tasks or groups
    lm_eval_include: str | None = None  # a directory of extra task YAML files
    num_fewshot: int | None = None  # default: each task's own
    limit: PositiveFloat | None = None  # examples per task (< 1: a fraction)
    bootstrap_iters: int = 100000  # the harness's stderr resamples (0 = none)
    quant_method: Literal["rtn", "gptq"] = "rtn"  # round to nearest, or GPTQ (calibrated)
    calibration_batches: PositiveInt = 32  # GPTQ: batches of train.batch_size windows
    gptq_damp: float = 0.01  # GPTQ: added to the Hessian's diagonal, times its mean
    gptq_act_order: bool = False  # GPTQ: quantize inputs by decreasing Hessian diagonal
    score_rewards: str | None = None  # JSON lines of responses to score with a reward model
    output: str | None = None  # --score_rewards' scores file (default under WORKDIR/eval/)
    prune: float | None = None  # one-shot magnitude pruning to this sparsity, in [0, 1)
    prune_pattern: str = "unstructured"  # or N:M, e.g. 2:4 (with --prune=1-N/M)
    prune_scope: str = "layer"  # unstructured: the smallest |w| per matrix, or global
    save: str | None = None  # write the --quantize weights as a new run in this directory

    @model_validator(mode="after")
    def _one_mode(self) -> "EvalRequest":
        suite = self.all_steps or (self.data and not self.gptq)
        require(not (self.quantize and suite), "quantize",
               "evaluates one checkpoint on the validation split; drop --all_steps/--data "
               "(with --quant_method=gptq, --data is the calibration set)")
        require(self.quant_method == "rtn" or bool(self.quantize), "quant_method",
               "quantizes weights: add --quantize=int8|int4|int3")
        require(not self.save or bool(self.quantize), "save",
               "writes the quantized weights as a new run: add --quantize=int8|int4|int3|nf4")
        require(not (self.quantize == "nf4" and self.quant_method == "gptq"), "quant_method",
               "gptq gives integers on a uniform grid; nf4 is rounded to its levels: drop "
               "--quant_method=gptq, or use --quantize=int8|int4|int3")
        require(0 < self.gptq_damp < 1, "gptq_damp",
               f"{self.gptq_damp} is not in (0, 1): it is a fraction of the mean of diag(H)")
        require(not (self.sample and suite), "sample",
               "samples from one checkpoint; drop --all_steps/--data")
        require(not (self.generation_set and (suite or self.sample or self.quantize or
                                              self.draft_workdir)), "generation_set",
               "scores one checkpoint's generations; drop --all_steps/--data/--sample/"
               "--quantize/--draft_workdir")
        require(not self.draft_workdir or self.sample, "draft_workdir",
               "is for sampling; add --sample")
        require(not (self.draft_workdir and self.generate.num_beams > 1), "num_beams",
               "beam search does not take a draft model; drop --draft_workdir")
        require(not (self.attention_maps and (suite or self.sample or self.quantize or
                                              self.draft_workdir or self.generation_set)),
               "attention_maps", "maps one checkpoint's attention; drop --all_steps/--data/"
               "--sample/--quantize/--draft_workdir/--generation_set")
        require(not (self.lm_eval and (suite or self.sample or self.quantize or
                                       self.draft_workdir or self.generation_set or
                                       self.attention_maps)), "lm_eval",
               "runs the harness on one checkpoint; drop --all_steps/--data/--sample/"
               "--quantize/--draft_workdir/--generation_set/--attention_maps")
        require(self.lm_eval_include is None or bool(self.lm_eval), "lm_eval_include",
               "adds tasks for --lm_eval; name the tasks to run with --lm_eval")
        require(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot",
               f"must be 0 or more (got {self.num_fewshot})")
        require(not self.attention_maps or len(self.prompts) == 1, "attention_maps",
               f"maps one prompt; got {len(self.prompts)} --prompt flags")
        require(not (self.score_rewards and (suite or self.sample or self.quantize or
                                             self.draft_workdir or self.generation_set or
                                             self.attention_maps or self.lm_eval or
                                             self.prune is not None)),
                "score_rewards", "scores with one checkpoint's reward head; drop --all_steps/"
                "--data/--sample/--quantize/--draft_workdir/--generation_set/"
                "--attention_maps/--lm_eval/--prune")
        require(self.output is None or bool(self.score_rewards), "output",
                "is where --score_rewards writes its scores; add --score_rewards")
        require(not (self.prune is not None and (suite or self.sample or self.quantize or
                                                 self.generation_set or self.attention_maps
                                                 or self.lm_eval)), "prune",
               "evaluates one checkpoint pruned on the validation split; drop --all_steps/"
               "--data/--sample/--quantize/--generation_set/--attention_maps/--lm_eval")
        _ = self.pruning  # parsing the --prune flags raises their errors here
        require(bool(self.evaluate or self.sample or self.quantize or suite or
                     self.generation_set or self.attention_maps or self.lm_eval or
                     self.score_rewards), "eval",
               "--noeval without --sample leaves nothing to do")
        return self

    @property
    def pruning(self) -> Prune | None:
        """The `prune` settings of --prune, --prune_pattern and --prune_scope, or None."""
        if self.prune is None:
            return None
        flag = {"sparsity": "prune", "pattern": "prune_pattern", "scope": "prune_scope"}
        try:
            return Prune.parse({"sparsity": self.prune, "pattern": self.prune_pattern,
                                "scope": self.prune_scope}, prefix="")
        except ConfigError as e:
            raise ConfigError(flag.get(e.key, e.key), e.message) from None

    @property
    def gptq(self) -> GptqSettings | None:
        """The GPTQ settings with --quant_method=gptq, else None."""
        if self.quant_method != "gptq":
            return None
        return GptqSettings(damp=self.gptq_damp, act_order=self.gptq_act_order)
