"""Sample outputs written the same way by every sampling command (layer 5).

``<out>.jsonl``: one record per sample ``{"id", "text", "ids", "length"}`` (+ ``prefix_len``,
``prefix_text`` when a prefix was clamped, + ``prefix_doc``, ``reference_text`` for validation
prefixes); ``<out>.meta.json``: the settings and what the sampler reports; variable-length
families also get ``<out>.length_histogram.{json,png}``; with a trajectory,
``<out>.trajectory.jsonl`` holds every step's sequences (ids, and their text with the states
that are not tokens shown by their labels: ``[MASK]``, a TDLM cluster as ``{the|a|an}``), and
with a viewer ``<out>.html`` animates it (:mod:`tdlm.viewer`). Every file is written
atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .utils.io import atomic_write_json, atomic_write_text


def sample_records(tokenizer, rows: Sequence, prefix_len: int = 0,
                   prefix_info: Optional[list] = None) -> list[dict]:
    """Records of generated id rows (lists or 1-D tensors, any lengths)."""
    recs = []
    for i, row in enumerate(rows):
        ids = row.tolist() if hasattr(row, "tolist") else list(row)
        r = {"id": i, "text": tokenizer.decode(ids), "ids": ids, "length": len(ids)}
        if prefix_len:
            r.update(prefix_len=prefix_len, prefix_text=tokenizer.decode(ids[:prefix_len]))
        if prefix_info is not None:
            r.update(prefix_doc=prefix_info[i]["doc"],
                     reference_text=tokenizer.decode(prefix_info[i]["reference_ids"]))
        recs.append(r)
    return recs


def render_states(tokenizer, ids: Sequence[int], labels: Optional[dict] = None) -> str:
    """Text of a sequence that may hold states that are not tokens: runs of tokens decoded
    together, a labelled state as ``[MASK]`` / ``{label}`` (``Family.state_labels``)."""
    if not labels:
        return tokenizer.decode(ids)
    out, run = [], []
    for i in ids:
        lab = labels.get(int(i))
        if lab is None:
            run.append(int(i))
            continue
        if run:
            out.append(tokenizer.decode(run))
            run = []
        out.append("[MASK]" if lab.get("kind") in ("mask", "root") else "{" + lab["label"] + "}")
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def write_samples(out_path: Path, recs: list, meta: dict, tokenizer=None,
                  trajectory: Optional[list] = None, length_histogram: bool = False,
                  labels: Optional[dict] = None, viewer: bool = False) -> dict:
    """Write the records, the optional trajectory (texts rendered with ``labels``), its
    viewer page (``viewer``) and length histogram, then the meta (which names the extra
    files). Returns the meta as written."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "".join(json.dumps(r) + "\n" for r in recs))
    lengths = [r["length"] for r in recs]
    meta = dict(meta, seq_len=max(lengths), mean_length=sum(lengths) / len(lengths))
    if length_histogram:
        from .data.histogram import write_length_histogram
        write_length_histogram(lengths, str(out_path.with_suffix("")) + ".length_histogram",
                               f"generated lengths ({len(recs)} samples, "
                               f"{meta.get('steps')} steps)")
    if trajectory is not None:
        tpath = out_path.with_suffix(".trajectory.jsonl")
        atomic_write_text(tpath, "".join(
            json.dumps({**rec, "text": [render_states(tokenizer, x, labels)
                                        for x in rec["ids"]]}) + "\n"
            for rec in trajectory))
        meta["trajectory"] = str(tpath)
        if labels:
            meta["state_labels"] = {str(k): v for k, v in labels.items()}
        if viewer:
            from .viewer import write_viewer
            meta["viewer"] = str(write_viewer(out_path.with_suffix(".html"), recs, trajectory,
                                              meta, tokenizer, labels))
    atomic_write_json(out_path.with_suffix(".meta.json"), meta)
    return meta
