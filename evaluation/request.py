"""eval.py's request: which checkpoints, which data, what to generate (typed flags)."""

from typing import ClassVar, Literal

from pydantic import model_validator

from jaxlm.configs.sections import PositiveInt, Sampling, Section, require
from jaxlm.models.gptq import GptqSettings


class Generate(Section):
    """eval.py's generation flags besides the sampling rules."""
    length: PositiveInt = 500  # tokens to generate per prompt
    seed: int = 0
    draft_tokens: PositiveInt = 4  # speculative decoding: tokens the draft proposes per round


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
    quantize: Literal["int8", "int4", "int3"] | None = None
    quant_granularity: str | None = None
    quant_symmetric: bool | None = None
    quant_method: Literal["rtn", "gptq"] = "rtn"  # round to nearest, or GPTQ (calibrated)
    calibration_batches: PositiveInt = 32  # GPTQ: batches of train.batch_size windows
    gptq_damp: float = 0.01  # GPTQ: added to the Hessian's diagonal, times its mean
    gptq_act_order: bool = False  # GPTQ: quantize inputs by decreasing Hessian diagonal

    @model_validator(mode="after")
    def _one_mode(self) -> "EvalRequest":
        suite = self.all_steps or (self.data and not self.gptq)
        require(not (self.quantize and suite), "quantize",
               "evaluates one checkpoint on the validation split; drop --all_steps/--data "
               "(with --quant_method=gptq, --data is the calibration set)")
        require(self.quant_method == "rtn" or bool(self.quantize), "quant_method",
               "quantizes weights: add --quantize=int8|int4|int3")
        require(0 < self.gptq_damp < 1, "gptq_damp",
               f"{self.gptq_damp} is not in (0, 1): it is a fraction of the mean of diag(H)")
        require(not (self.sample and suite), "sample",
               "samples from one checkpoint; drop --all_steps/--data")
        require(not self.draft_workdir or self.sample, "draft_workdir",
               "is for sampling; add --sample")
        require(bool(self.evaluate or self.sample or self.quantize or suite), "eval",
               "--noeval without --sample leaves nothing to do")
        return self

    @property
    def gptq(self) -> GptqSettings | None:
        """The GPTQ settings with --quant_method=gptq, else None."""
        if self.quant_method != "gptq":
            return None
        return GptqSettings(damp=self.gptq_damp, act_order=self.gptq_act_order)
