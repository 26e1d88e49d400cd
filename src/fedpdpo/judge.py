"""Judges: scorers of generated text that the method did not train, to show how the models *behave*.

A judge maps (prompts, responses) to one float per response; higher means "more of what the judge measures". Which
side a client prefers is not assumed: it is read from the client's own training pairs (the sign of the judge's
mean chosen-minus-rejected score), so a sentiment judge serves a client that prefers negative reviews as well as
one that prefers positive ones, and a reward model serves any data.

Built in, selected by ``--judge SPEC``:

* ``sentiment``: VADER's compound polarity in [-1, 1] (the ``vaderSentiment`` lexicon, offline), for IMDB-like
  data; 0 is neutral, so "a sample matches a client" means its polarity has the client's sign.
* a directory with a Hugging Face sequence-classification model (a reward model): its first logit.
* ``package.module:function``: any Python callable ``f(prompts, responses) -> list[float]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpdpo.errors import ConfigError

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float]]


@dataclass
class Judge:
    name: str
    score: ScoreFn
    #: Whether 0 separates the judge's two sides (sentiment polarity), so "matches the client" is meaningful.
    zero_is_neutral: bool = False

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = [float(s) for s in self.score(prompts, responses)]
        if len(scores) != len(responses):
            raise ConfigError(f"judge {self.name!r} returned {len(scores)} scores for {len(responses)} responses")
        return scores


def sentiment_judge() -> Judge:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("the sentiment judge needs the vaderSentiment package: pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [analyzer.polarity_scores(r)["compound"] for r in responses]

    return Judge("sentiment (VADER compound)", score, zero_is_neutral=True)


def reward_model_judge(path: Path, batch_size: int = 8) -> Judge:
    """A sequence-classification model directory as a judge: score = first logit of (prompt, response)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(responses), batch_size):
            enc = tokenizer(
                list(prompts[i : i + batch_size]),
                list(responses[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
            )
            out.extend(model(**enc).logits[:, 0].float().tolist())
        return out

    return Judge(f"reward model {path.name}", score)


def load_judge(spec: str) -> Judge:
    """The judge named by ``spec`` (see the module docstring)."""
    if spec == "sentiment":
        return sentiment_judge()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--judge {spec}: directory has no config.json (not a Hugging Face model)")
        return reward_model_judge(path)
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--judge {spec}: cannot import {attr!r} from {module!r} ({exc})") from None
        if isinstance(fn, Judge):
            return fn
        if not callable(fn):
            raise ConfigError(f"--judge {spec}: {attr!r} is not callable")
        return Judge(spec, fn)
    raise ConfigError(f"--judge {spec!r}: use 'sentiment', a reward-model directory, or 'package.module:function'")
