"""The public API in one place (a façade: nothing inside the package imports it)::

    import tdlm
    pipe = tdlm.load("runs/quickstart/checkpoints/latest-or-step-folder")
    texts = pipe.generate(num=4, steps=128, seed=0)
    print(pipe.nelbo(["Some text to score."]))
"""
from __future__ import annotations

from .pipeline import (Pipeline, from_pretrained, load, load_tokenizer,  # noqa: F401
                       save_pretrained)


def load_scheduled(paths: dict, device: str = "cpu", use_ema: bool = True):
    """Load named checkpoints (``{"H": "runs/heavy", "L": "runs/light"}``) into a
    :class:`tdlm.scheduling.ScheduledSampler`: ``generate_ids(num, steps, schedule=
    "sandwich:0.25", seed=0)``; its ``last_report`` holds forward calls, FLOPs and savings."""
    from .scheduling.sampler import load_scheduled as _load_scheduled
    return _load_scheduled(paths, device=device, use_ema=use_ema)


def generative_perplexity(samples, judge, **kw) -> dict:
    """Gen PPL + mean unigram entropy of samples (texts, id lists or ``tdlm sample`` records,
    any lengths) under a judge (a tdlm AR checkpoint or a local Hugging Face folder); see
    :func:`tdlm.eval.genppl.generative_perplexity`."""
    from .eval.genppl import generative_perplexity as _gp
    return _gp(samples, judge, **kw)
