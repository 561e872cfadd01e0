"""Mixtures of prepared data sets: `data.mixture = "DIR_A:0.7,DIR_B:0.3"`."""

import dataclasses
from pathlib import Path

import numpy as np

from jaxlm.configs.errors import ConfigError
from jaxlm.configs.sections import Data
from jaxlm.configs.specs import parse_mixture
from jaxlm.data.pipeline import TokenData, check_tokenizer_spec, resolve_data
from jaxlm.data.prepare import META, is_prepared
from jaxlm.data.tokenizers import Tokenizer


@dataclasses.dataclass
class Mixture:
    """Prepared sets sharing one tokenizer, sampled by weight (rows of a batch).

    A weight of 0 keeps a source for evaluation only: it gets per-source eval batches
    but no training rows. Source i of a batch's `source` key is `names[i]`. One prepared
    set is the Mixture of one source (`of_set`); batches of several sources carry
    `source` and `tokens_seen` (data/packing.py), those of one source do not."""

    names: list[str]
    sources: list[TokenData]
    weights: np.ndarray  # float64 [sources], normalised to sum to 1
    key: str = "data.mixture"  # the config key an error about the sources names

    @classmethod
    def of_set(cls, data: TokenData) -> "Mixture":
        """One prepared set as a one-source Mixture named by its directory (`data.path`)."""
        return cls([data.path.name], [data], np.ones(1), "data.path")

    @property
    def is_mixture(self) -> bool:
        """Whether there are several sources (per-source counts, tags and evaluation)."""
        return len(self.sources) > 1

    def named(self) -> list[tuple[str, TokenData, float]]:
        """(name, prepared set, weight) of every source."""
        return list(zip(self.names, self.sources, self.weights.tolist()))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.sources[0].tokenizer

    @property
    def vocab_size(self) -> int:
        return self.sources[0].vocab_size

    @property
    def token_bytes(self) -> np.ndarray:
        return self.sources[0].token_bytes

    @classmethod
    def parse(cls, spec: str, key: str = "data.mixture") -> "Mixture":
        """`DIR:WEIGHT,DIR:WEIGHT,...` -> a Mixture of the prepared directories."""
        items = parse_mixture(spec, key)
        paths = [Path(p) for p, _ in items]
        weights = [w for _, w in items]
        total = float(sum(weights))
        sources = []
        for p in paths:
            if not is_prepared(p):
                raise ConfigError(key, f"{p} is not a prepared token directory (no {META}); "
                                       f"prepare it with python -m jaxlm.data.prepare")
            sources.append(TokenData.load(p))
        first = sources[0].tokenizer.to_dict()
        for p, s in zip(paths[1:], sources[1:]):
            if s.tokenizer.to_dict() != first:
                raise ConfigError(key, f"{p} was prepared with another tokenizer "
                                       f"({s.tokenizer.kind}, {s.vocab_size} tokens) than "
                                       f"{paths[0]} ({sources[0].tokenizer.kind}, "
                                       f"{sources[0].vocab_size} tokens); mixture sources "
                                       f"must share the tokenizer")
        names = []
        for i, p in enumerate(paths):
            name = p.resolve().name or str(p)
            names.append(name if name not in names else f"{name}_{i}")
        return cls(names, sources, np.asarray(weights, np.float64) / total)


def resolve_mixture(data_cfg: Data) -> Mixture:
    """`data.mixture` as a Mixture, checking its tokenizer against `data.tokenizer`."""
    mixture = Mixture.parse(data_cfg.mixture)
    check_tokenizer_spec(data_cfg.tokenizer, mixture.tokenizer,
                         f"the mixture's first source {mixture.sources[0].path}")
    return mixture


def resolve_sources(data_cfg: Data, workdir: str | Path) -> Mixture:
    """The training data of a `data` config section: `data.mixture` when set, else the
    one set of `data.path` (prepared under `workdir` when it is text)."""
    if data_cfg.mixture.strip():
        return resolve_mixture(data_cfg)
    return Mixture.of_set(resolve_data(data_cfg, workdir))
