"""Deprecated location, kept so existing imports work: exported-model folders are
:mod:`tdlm.store.export`; ``save_pretrained`` / ``from_pretrained`` are in :mod:`tdlm.pipeline`
(and ``tdlm.save_pretrained`` / ``tdlm.from_pretrained``)."""
from .pipeline import from_pretrained, save_pretrained  # noqa: F401
from .store.export import (MANIFEST, REQUIRED, PretrainedCheckpoint,  # noqa: F401
                           is_pretrained_folder, load_pretrained_checkpoint)
